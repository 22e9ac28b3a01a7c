"""Text pictures, matplotlib pictures and the `maskc` command line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

import maskc
from maskc import Kind, Mask
from maskc import picture as pc
from maskc.cli import DEFAULT_MASK, load_mask, main

from conftest import masks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def frame_rows(text: str) -> list[str]:
    """The cell rows of an ascii picture (between the '|' of the frame)."""
    return [line.split("|")[1] for line in text.splitlines() if line.count("|") == 2]


# ---- ascii picture -------------------------------------------------------------------------------


def test_causal_full_resolution_rows():
    text = maskc.causal(8).ascii()
    assert frame_rows(text) == ["C" * (i + 1) + "." * (7 - i) for i in range(8)]
    lines = text.splitlines()
    assert lines[0].split() == ["key", "->", "0", "7"]
    assert lines[2].split()[0] == "0" and lines[-4].split()[0] == "7"  # first / last query rows
    assert "query" in text
    assert lines[-2].startswith("F FULL  C CAUSAL  I INV_CAUSAL  B BI_CAUSAL")
    assert "cell = 1 query x 1 key" in lines[-2]
    assert lines[-1] == "8 x 8, 1 slice (CAUSAL 1), area 36, density 0.5625"


def test_full_is_all_F_and_downsampled():
    text = maskc.full(1000, 3000).ascii(width=40, height=20)
    rows = frame_rows(text)
    assert rows and all(set(r) == {"F"} for r in rows)
    assert len(rows[0]) <= 40 and len(rows) <= 20
    assert text.splitlines()[-1] == "1000 x 3000, 1 slice (FULL 1), area 3,000,000, density 1"


def test_partial_vs_full_cells_and_kind_letters():
    # 4 x 4 cells of 2 x 2 positions: the diagonal cells of causal(8) are partly allowed
    m = maskc.causal(8)
    R, C = pc.edges(8, 4), pc.edges(8, 4)
    rows = pc.cell_chars(pc.cell_areas(m, R, C), R, C)
    assert rows == ["c...", "Cc..", "CCc.", "CCCc"]
    # the causal sliding window: a CAUSAL head then a BI_CAUSAL band
    rows = frame_rows(maskc.sliding_window(12, 3).ascii())
    assert rows[0] == "C..........." and rows[2] == "CCC........."
    assert rows[3] == ".BBB........" and rows[11] == ".........BBB"
    # INV_CAUSAL is drawn with I
    inv = Mask([((0, 4), (0, 4), Kind.INV_CAUSAL)], sq=4, sk=4)
    assert frame_rows(inv.ascii()) == ["IIII", ".III", "..II", "...I"]
    assert frame_rows(Mask(sq=3, sk=5).ascii()) == ["....."] * 3


def test_dominant_kind_wins_a_mixed_cell():
    # FULL rows 0-1 (8 pairs) above a CAUSAL triangle in rows 2-5 (10 pairs)
    m = Mask([((0, 2), (0, 4), Kind.FULL), ((2, 6), (0, 4), Kind.CAUSAL)], sq=6, sk=4)
    assert m.array.tolist() == [[0, 2, 0, 4, 0], [2, 6, 0, 4, 1]]
    areas = pc.cell_areas(m, [0, 6], [0, 4])
    assert areas[:, 0, 0].tolist() == [8, 10, 0, 0]
    assert pc.cell_chars(areas, [0, 6], [0, 4]) == ["c"]
    assert pc.cell_chars(pc.cell_areas(m, [0, 2, 6], [0, 4]), [0, 2, 6], [0, 4]) == ["F", "c"]
    assert pc.cell_chars(pc.cell_areas(m, [0, 3, 6], [0, 4]), [0, 3, 6], [0, 4]) == ["f", "c"]


def test_grid_shape_rules():
    assert pc.grid_shape(8, 8) == (8, 8)  # fits: full resolution
    assert pc.grid_shape(4096, 4096) == (32, 64)  # square: chars are ~2x taller than wide
    h, w = pc.grid_shape(100, 4000)
    assert w == 64 and 8 <= h <= 32
    h, w = pc.grid_shape(4000, 100)
    assert h == 32 and 8 <= w <= 64
    assert pc.grid_shape(3, 4000) == (3, 64)  # never more cells than positions
    assert pc.grid_shape(0, 5) == (0, 0)


def test_empty_domain_and_bad_width():
    assert "nothing to draw" in Mask(sq=0, sk=0).ascii()
    with pytest.raises(maskc.MaskError, match="width"):
        maskc.causal(4).ascii(width=0)
    assert maskc.causal(4).ascii(legend=False).splitlines()[-1].startswith(" " * 6 + " +")


def test_four_million_tokens_is_fast():
    import time

    m = maskc.magi_video([32] * 16, 8192)
    t = time.perf_counter()
    text = m.ascii()
    assert time.perf_counter() - t < 1.0
    assert "4194304 x 4194304, 512 slices (FULL 512)" in text
    R, C = pc.edges(m.sq, 32), pc.edges(m.sk, 64)
    assert int(pc.cell_areas(m, R, C).sum()) == m.area


# ---- exact cell areas against dense ------------------------------------------------------------


def dense_cell_areas(dense, kinds_dense, R, C):
    out = np.zeros((4, len(R) - 1, len(C) - 1), dtype=np.int64)
    for k in range(4):
        d = dense & (kinds_dense == k)
        for r in range(len(R) - 1):
            for c in range(len(C) - 1):
                out[k, r, c] = d[R[r] : R[r + 1], C[c] : C[c + 1]].sum()
    return out


def kind_map(m: Mask) -> np.ndarray:
    """Dense kind id of the (disjoint) slice covering each pair, -1 where none."""
    km = np.full(m.shape, -1)
    for s in m.slices:
        part = Mask([s], sq=m.sq, sk=m.sk).to_dense()
        km[part] = int(s.kind)
    return km


@st.composite
def sorted_edges(draw, n):
    inner = draw(st.lists(st.integers(0, n), max_size=6))
    lo = draw(st.integers(0, n))
    hi = draw(st.integers(lo, n))
    return sorted({lo, hi, *[x for x in inner if lo <= x <= hi]})


@given(masks(max_side=14, max_slices=6), st.data())
def test_cell_areas_exact_against_dense(md, data):
    m, dense = md
    R = np.array(data.draw(sorted_edges(m.sq)))
    C = np.array(data.draw(sorted_edges(m.sk)))
    got = pc.cell_areas(m, R, C)
    assert got.shape == (4, len(R) - 1, len(C) - 1)
    assert np.array_equal(got, dense_cell_areas(dense, kind_map(m), R, C))


def test_cell_areas_random_bigger_masks():
    rng = np.random.default_rng(0)
    for _ in range(25):
        sq, sk = rng.integers(1, 60, size=2)
        slices = []
        for _ in range(rng.integers(1, 12)):
            qs, qe = sorted(rng.integers(0, sq + 1, size=2))
            ks, ke = sorted(rng.integers(0, sk + 1, size=2))
            slices.append(((int(qs), int(qe)), (int(ks), int(ke)), int(rng.integers(0, 4))))
        m = Mask(slices, sq=int(sq), sk=int(sk))
        H, W = pc.grid_shape(m.sq, m.sk, int(rng.integers(1, 20)), int(rng.integers(1, 20)))
        R, C = pc.edges(m.sq, H), pc.edges(m.sk, W)
        assert np.array_equal(pc.cell_areas(m, R, C), dense_cell_areas(m.to_dense(), kind_map(m), R, C))


def test_prefix_grid_matches_prefix_area():
    from maskc.normalize import prefix_area

    m = maskc.sliding_window(300, 17, causal=False) | maskc.varlen([50, 100, 150], Kind.BI_CAUSAL)
    R, C = pc.edges(m.sq, 13), pc.edges(m.sk, 29)
    assert np.array_equal(pc.prefix_grid(m.bands, R, C), prefix_area(m.bands, R[:, None], C[None, :]))


# ---- matplotlib ------------------------------------------------------------------------------------


def test_slice_polygons_areas():
    m = maskc.sliding_window(40, 7, causal=False) | maskc.full(40).shift(35, 0)
    verts, kinds = pc.slice_polygons(m)
    assert verts.shape == (len(m), 8, 2) and list(kinds) == m.array[:, 4].tolist()
    x, y = verts[..., 0], verts[..., 1]
    shoelace = 0.5 * np.abs((x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y).sum(axis=1))
    exact = np.array([s.area for s in m.slices], dtype=float)
    lq = m.array[:, 1] - m.array[:, 0]
    assert np.all(np.abs(shoelace - exact) <= 0.25 + 1e-9)  # only the clipped corners differ
    assert np.allclose(shoelace[lq == 1], exact[lq == 1])  # one-row slices: exact rectangles of height 1
    assert verts[..., 0].min() >= 0 and verts[..., 0].max() <= m.sk


def test_plot_writes_png(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = maskc.sliding_window(64, 9) | maskc.global_tokens(64, 2, 4)
    path = tmp_path / "m.png"
    fig = m.plot(path, title="sliding window")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    assert ax.get_xlabel() == "key position" and ax.get_ylabel() == "query position"
    assert ax.get_ylim() == (64, 0)  # row 0 at the top
    assert "sliding window" in ax.get_title() and "64 x 64" in ax.get_title()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(lab.startswith("BI_CAUSAL") for lab in labels)
    plt.close(fig)
    # into an existing axes, no outlines beyond max_outline, no file
    fig2, ax2 = plt.subplots()
    assert pc.plot(maskc.varlen([3] * 20), ax=ax2, max_outline=5) is fig2
    assert "outlines skipped" in ax2.get_title()
    plt.close(fig2)


# ---- command line ----------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def cli_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_show_expression(capsys):
    out = run_cli(capsys, "show", "causal(4096) | sliding_window(4096, 256)")
    assert out.startswith("mask: causal(4096) | sliding_window(4096, 256)\n")
    assert "4096 x 4096, 1 slice (CAUSAL 1), area 8,390,656, density 0.5001" in out
    rows = frame_rows(out)
    assert len(rows) == 32 and len(rows[0]) == 64


def test_show_default_is_magi_training_mask(capsys):
    out = run_cli(capsys, "show")
    assert DEFAULT_MASK in out and "MAGI-1" in out
    assert load_mask(None) == maskc.magi_video([4, 6], 1024)
    assert "10240 x 10240, 10 slices (FULL 10)" in out


def test_show_py_and_json_files_slices_and_outputs(capsys, tmp_path):
    py = tmp_path / "my_mask.py"
    py.write_text("import maskc\nmask = maskc.prefix_lm(64, 16)\n")
    out = run_cli(capsys, "show", str(py), "--slices", "--json", str(tmp_path / "m.json"))
    assert "slices: all 2" in out and "FULL" in out and "CAUSAL" in out
    assert "[16, 64)  [ 0, 64)  CAUSAL" in out
    assert "wrote mask JSON (2 slices)" in out
    saved = Mask.from_json((tmp_path / "m.json").read_text())
    assert saved == maskc.prefix_lm(64, 16)
    assert json.loads((tmp_path / "m.json").read_text())["format"] == "maskc.mask"

    out = run_cli(capsys, "show", str(tmp_path / "m.json"), "--slices", "1", "--width", "16", "--height", "8")
    assert "slices: first 1 of 2" in out and "... 1 more" in out
    assert len(frame_rows(out)[0]) <= 16 and len(frame_rows(out)) <= 8

    out = run_cli(capsys, "show", "varlen([5] * 30)", "--slices")
    assert "slices: first 20 of 30" in out

    matplotlib = pytest.importorskip("matplotlib")
    png = tmp_path / "v.png"
    out = run_cli(capsys, "show", "magi_video([8, 8], 1024, window=4)", "--png", str(png))
    assert f"wrote picture to {png}" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert matplotlib.get_backend().lower() == "agg"


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        main(["show", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "an expression" in out and "a .py file" in out and "a .json file" in out
    assert "sliding_window(4096, 256)" in out and "`mask`" in out
    for letter, name in zip("FCIB", ["FULL", "CAUSAL", "INV_CAUSAL", "BI_CAUSAL"]):
        assert f"{letter}  {name}" in out
    assert "examples:" in out and out.count("maskc show") >= 4
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "show" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"maskc {maskc.__version__}"


def test_errors_are_one_line(capsys, tmp_path):
    err = cli_error(capsys, "show", "causl(16)")
    assert err.startswith("maskc: error: ") and "causl" in err and "did you mean 'causal'" in err
    err = cli_error(capsys, "show", "causal(16")
    assert "nor a valid Python expression" in err and err.count("\n") == 1
    err = cli_error(capsys, "show", str(tmp_path / "missing.json"))
    assert "not found" in err and "missing.json" in err
    for command in ("show", "plan"):  # a --json output that cannot be written
        err = cli_error(capsys, command, "causal(256)", "--json", str(tmp_path / "no-dir" / "out.json"))
        assert err.startswith("maskc: error: cannot write ") and "no-dir" in err and err.count("\n") == 1
    err = cli_error(capsys, "show", "Mask([((0, 20), (0, 4), FULL)], sq=16)")
    assert "out of bounds" in err and err.startswith("maskc: error: slice 0")
    err = cli_error(capsys, "show", "1 + 2")
    assert "not a maskc.Mask" in err
    err = cli_error(capsys, "show", "__import__('os')")
    assert "__import__" in err
    bad = tmp_path / "bad.py"
    bad.write_text("import maskc\n\nmask = maskc.causal(4, 8) | maskc.full(4)\n")
    err = cli_error(capsys, "show", str(bad))
    assert f"{bad}:3:" in err and "shape mismatch" in err
    nomask = tmp_path / "nomask.py"
    nomask.write_text("x = 1\n")
    assert "defines no variable `mask`" in cli_error(capsys, "show", str(nomask))
    syn = tmp_path / "syn.py"
    syn.write_text("mask = (\n")
    assert "syntax error" in cli_error(capsys, "show", str(syn))


def test_python_dash_m(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "maskc", "show", "causal(16)"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
        env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert proc.returncode == 0, proc.stderr
    assert "16 x 16, 1 slice (CAUSAL 1), area 136" in proc.stdout
    assert frame_rows(proc.stdout)[15] == "C" * 16
    proc = subprocess.run(
        [sys.executable, "-m", "maskc", "show", "nope("],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
        env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert proc.returncode == 2 and proc.stderr.startswith("maskc: error:")


# ---- maskc plan --------------------------------------------------------------------------------


def test_plan_command_default_and_json(tmp_path, capsys):
    from maskc.plan import Plan

    out = tmp_path / "plan.json"
    assert main(["plan", "--cp", "4", "--width", "40", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Plan(cp=4" in text and "(the default: MAGI-1's packed training mask)" in text
    picture = next(line for line in text.splitlines() if line.startswith("|"))
    assert len(picture) == 42 and set(picture[1:-1]) <= set("0123*")  # 40 cells of rank ids
    for name in ("maskc (sequence)", "ring-zigzag", "ulysses", "allgather"):
        assert name in text
    plan = Plan.from_json(out.read_text())
    assert plan.cp_size == 4 and plan.mask == load_mask(DEFAULT_MASK)


def test_plan_command_heads_choice(capsys):
    # dense causal on 16 ranks with the model's heads: the head-parallel plan moves fewer bytes
    assert main(["plan", "causal(1 << 16)", "--cp", "16", "--heads", "32", "8", "128"]) == 0
    text = capsys.readouterr().out
    assert "head-parallel: 2 of 32 query heads" in text and "maskc (heads)" in text
    assert main(["plan", "causal(1 << 16)", "--cp", "16", "--heads", "32", "8", "128", "--scheme", "sequence"]) == 0
    assert "maskc (sequence)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["plan", "Mask([((0, 4), (0, 8), FULL)], sq=4, sk=8)"], "not square"),
    (["plan", "causal(64)", "--cp", "3", "--heads", "8", "2", "64", "--scheme", "heads", "--block", "16"],
     "do not split over cp_size=3"),
])
def test_plan_command_errors(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_plan_picture_of_a_head_parallel_plan():
    from maskc.cost import Workload

    p = maskc.compile(maskc.causal(4096), cp_size=4, workload=Workload(hq=8, hkv=2), scheme="heads")
    lines = p.ascii(16).splitlines()
    assert lines[1].startswith("|") and len(lines[1]) == 18
    assert [ln.split()[2] for ln in lines[3:]] == ["25.0%"] * 4  # work split by heads
