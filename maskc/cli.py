"""The ``maskc`` command line.

Subcommands live in a registry (`COMMANDS`): each is a `Command` with its help text, a function
that adds its arguments and a function that runs it. Commands that take a mask add the shared
``MASK`` argument with `add_mask_argument` and read it with `mask_from_args` (built on
`load_mask`, which accepts an expression, a ``.py`` file or a mask ``.json``).

Errors a user can cause (a bad mask, a bad expression, a missing file) print one line
``maskc: error: ...`` to stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import builtins
import difflib
import os
import runpy
import sys
import textwrap
import traceback
from dataclasses import dataclass, field
from typing import Callable

import maskc

from .errors import MaskError
from .kinds import Kind
from .kinds import slice_area
from .mask import Mask
from .picture import ascii_picture

PROG = "maskc"

DEFAULT_MASK = "magi_video([4, 6], 1024)"
DEFAULT_MASK_NOTE = (
    "MAGI-1's packed training mask: two videos of 4 and 6 chunks of 1024 tokens, "
    "each chunk sees its own video's chunks up to itself (block-causal)"
)

SAFE_BUILTINS = {
    name: getattr(builtins, name)
    for name in (
        "abs", "all", "any", "bool", "dict", "divmod", "enumerate", "float", "int", "len",
        "list", "max", "min", "pow", "range", "reversed", "round", "sorted", "sum", "tuple", "zip",
    )
}


class CLIError(Exception):
    """A user-facing error: printed as ``maskc: error: <message>``, exit status 2."""


# ---- loading masks ---------------------------------------------------------------------------


def mask_namespace() -> dict:
    """Names a MASK expression may use: ``maskc.__all__`` and the Kind members."""
    ns = {name: getattr(maskc, name) for name in maskc.__all__}
    ns.update({k.name: k for k in Kind})
    return ns


def _looks_like_path(text: str) -> bool:
    t = text.strip()
    if t.lower().endswith((".py", ".json")):
        return True
    return ("/" in t or os.sep in t) and not any(c in t for c in "()[]|&~")


def load_mask(text: str | None) -> Mask:
    """A `Mask` from a MASK argument; raises `CLIError` or `MaskError` with a one-line reason.

    ``text`` is (a) a path to a mask ``.json`` (`Mask.to_json` output), (b) a path to a ``.py``
    file that defines a variable ``mask``, or (c) a Python expression over maskc's public names
    (``maskc.__all__``, the kinds FULL, CAUSAL, INV_CAUSAL, BI_CAUSAL and a few safe builtins
    such as range, list, min, max, sum, len). ``None`` or empty means `DEFAULT_MASK`.

    An expression runs with restricted builtins, but this is not a sandbox: MASK (like a
    ``.py`` file) is trusted code from the person running the command.
    """
    if text is None or not text.strip():
        text = DEFAULT_MASK
    if os.path.isfile(text):
        return _load_file(text)
    if _looks_like_path(text):
        raise CLIError(f"MASK file not found: {text}")
    return _eval_expression(text)


def _load_file(path: str) -> Mask:
    low = path.lower()
    if low.endswith(".py"):
        return _run_python_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read MASK file {path}: {getattr(e, 'strerror', None) or e}") from None
    if low.endswith(".json") or data.lstrip().startswith("{"):
        try:
            return Mask.from_json(data)
        except MaskError as e:
            raise MaskError(f"{path}: {e}") from None
    raise CLIError(
        f"MASK file {path} is neither a .py file defining `mask` nor a mask .json"
    )


def _run_python_file(path: str) -> Mask:
    try:
        ns = runpy.run_path(path, run_name="__maskc__")
    except SyntaxError as e:
        raise CLIError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except MaskError as e:
        raise MaskError(f"{path}{_where(e, path)}: {e}") from None
    except SystemExit as e:
        raise CLIError(f"{path} called exit({e.code!r}) instead of defining `mask`") from None
    except Exception as e:  # user code: report where and what, no traceback
        raise CLIError(f"{path}{_where(e, path)}: {type(e).__name__}: {e}") from None
    if "mask" not in ns:
        raise CLIError(f"{path} defines no variable `mask`; assign the Mask to show to `mask`")
    mask = ns["mask"]
    if not isinstance(mask, Mask):
        raise CLIError(f"{path}: `mask` is {_a(type(mask).__name__)}, not a maskc.Mask")
    return mask


def _a(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _where(exc: BaseException, path: str) -> str:
    """``:LINE`` of the innermost frame of ``exc`` inside ``path``, or ''."""
    target = os.path.abspath(path)
    line = None
    for fr in traceback.extract_tb(exc.__traceback__):
        if os.path.abspath(fr.filename) == target:
            line = fr.lineno
    return f":{line}" if line else ""


def _eval_expression(text: str) -> Mask:
    src = text.strip()
    shown = src if len(src) <= 60 else src[:57] + "..."
    try:
        code = compile(src, "<MASK>", "eval")
    except SyntaxError as e:
        col = f" at column {e.offset}" if e.offset else ""
        raise CLIError(
            f"MASK {shown!r} is neither a file nor a valid Python expression: {e.msg}{col}"
        ) from None
    ns = mask_namespace()
    try:
        value = eval(code, {"__builtins__": SAFE_BUILTINS}, ns)  # noqa: S307 (trusted user input)
    except MaskError:
        raise
    except NameError as e:
        name = getattr(e, "name", None)
        hint = ""
        if name:
            close = difflib.get_close_matches(name, list(ns) + list(SAFE_BUILTINS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
        raise CLIError(
            f"MASK {shown!r}: {e}{hint} (available: {', '.join(sorted(maskc.__all__))})"
        ) from None
    except Exception as e:
        raise CLIError(f"MASK {shown!r}: {type(e).__name__}: {e}") from None
    if not isinstance(value, Mask):
        raise CLIError(f"MASK {shown!r} evaluated to {_a(type(value).__name__)}, not a maskc.Mask")
    return value


# ---- the registry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One ``maskc`` subcommand."""

    name: str
    help: str  # one line, listed by ``maskc --help``
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    epilog: str = ""
    aliases: tuple[str, ...] = field(default=())


COMMANDS: dict[str, Command] = {}


def register(cmd: Command) -> Command:
    """Add a subcommand to `COMMANDS` (name clashes are a programming error)."""
    if cmd.name in COMMANDS:
        raise ValueError(f"maskc subcommand {cmd.name!r} registered twice")
    COMMANDS[cmd.name] = cmd
    return cmd


MASK_FORMS = f"""\
MASK is one of:
  an expression   a Python expression over maskc's names, e.g.
                    "causal(4096) | sliding_window(4096, 256)"
                    "magi_video([8, 8], 1024, window=4)"
                    "varlen([1000, 3000, 96], CAUSAL)"
                    "Mask([((0, 64), (0, 128), CAUSAL)], sq=128, sk=128)"
{{names}}
  a .py file      run as a script; it must define a variable `mask`, e.g.
                    my_mask.py:  import maskc; mask = maskc.prefix_lm(2048, 512)
  a .json file    a saved mask (Mask.to_json, or `maskc show ... --json out.json`)
  (omitted)       {DEFAULT_MASK}:
{{default}}
"""
MASK_FORMS = MASK_FORMS.replace("{names}", textwrap.fill(
    "names: " + ", ".join(sorted(maskc.__all__)) + "; builtins: " + ", ".join(sorted(SAFE_BUILTINS)),
    width=92, initial_indent=" " * 18, subsequent_indent=" " * 18,
)).replace("{default}", textwrap.fill(
    DEFAULT_MASK_NOTE, width=92, initial_indent=" " * 18, subsequent_indent=" " * 18
))

KINDS_TEXT = """\
Kinds (a slice (q=[qs,qe), k=[ks,ke), kind) allows query i, key j when ...) and picture letters:
  F  FULL        0  always
  C  CAUSAL      1  j - ks <= (i - qs) + (Lk - Lq)   bottom-right aligned
  I  INV_CAUSAL  2  j - ks >= i - qs                 top-left aligned
  B  BI_CAUSAL   3  both: a band
  .  empty cell; upper-case letter: the whole cell is allowed, lower case: part of it
"""


def add_mask_argument(parser: argparse.ArgumentParser) -> None:
    """The shared optional positional ``MASK`` (see `load_mask`)."""
    parser.add_argument(
        "mask",
        nargs="?",
        default=None,
        metavar="MASK",
        help=f"an expression, a .py file defining `mask`, or a mask .json (default: {DEFAULT_MASK})",
    )


def mask_from_args(args: argparse.Namespace) -> tuple[Mask, str]:
    """``(mask, how it was given)`` from the shared MASK argument."""
    text = args.mask
    if text is None or not text.strip():
        return load_mask(DEFAULT_MASK), f"{DEFAULT_MASK}  (the default: MAGI-1's packed training mask)"
    return load_mask(text), text


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (shared by the maskc and magi command lines)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {n}")
    return n


# ---- maskc show --------------------------------------------------------------------------------


def _show_arguments(p: argparse.ArgumentParser) -> None:
    add_mask_argument(p)
    p.add_argument("--width", type=positive_int, default=64, metavar="W",
                   help="most picture columns (default: %(default)s)")
    p.add_argument("--height", type=positive_int, default=32, metavar="H",
                   help="most picture rows (default: %(default)s)")
    p.add_argument("--slices", type=nonneg_int, nargs="?", const=20, default=None, metavar="N",
                   help="also list the first N canonical slices (N defaults to 20)")
    p.add_argument("--png", metavar="OUT.png",
                   help="also draw the mask exactly with matplotlib into this PNG")
    p.add_argument("--json", metavar="OUT.json", help="also save the mask as JSON")


def format_slices(mask: Mask, n: int) -> str:
    """A table of the first ``n`` canonical slices."""
    total = len(mask)
    shown = mask.array[:n]
    head = f"slices: first {len(shown)} of {total} (canonical order)" if n < total else f"slices: all {total}"
    if not len(shown):
        return head
    pos_w = max(len(str(int(shown[:, :4].max()))), 2)
    idx_w = max(len(str(len(shown) - 1)), 1)
    rows = [head, f"{'#':>{idx_w}}  {'q range':^{2 * pos_w + 4}}  {'k range':^{2 * pos_w + 4}}  {'kind':<10}  area"]
    for t, (qs, qe, ks, ke, kind) in enumerate(shown.tolist()):
        area = slice_area(qe - qs, ke - ks, kind)
        rows.append(
            f"{t:>{idx_w}}  [{qs:>{pos_w}}, {qe:>{pos_w}})  [{ks:>{pos_w}}, {ke:>{pos_w}})  "
            f"{Kind(kind).name:<10}  {area:,}"
        )
    if n < total:
        rows.append(f"... {total - len(shown)} more")
    return "\n".join(rows)


def _write_text(path: str, text: str) -> None:
    """`text` and a newline into `path` (a --json output); a CLIError naming the path when it cannot."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
            f.write("\n")
    except OSError as e:
        raise CLIError(f"cannot write {path}: {e.strerror or e}") from None


def _show_run(args: argparse.Namespace) -> int:
    mask, source = mask_from_args(args)
    out = sys.stdout
    print(f"mask: {source}", file=out)
    print(ascii_picture(mask, width=args.width, height=args.height, legend=True), file=out)
    if args.slices is not None:
        print(format_slices(mask, args.slices), file=out)
    if args.json:
        _write_text(args.json, mask.to_json())
        print(f"wrote mask JSON ({len(mask)} slice{'' if len(mask) == 1 else 's'}) to {args.json}", file=out)
    if args.png:
        try:
            import matplotlib
        except ImportError:
            raise CLIError("--png needs matplotlib (pip install matplotlib)") from None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        title = source if len(source) <= 90 else source[:87] + "..."
        try:
            from .picture import plot

            fig = plot(mask, args.png, title=title)
        except OSError as e:
            raise CLIError(f"cannot write {args.png}: {e.strerror or e}") from None
        plt.close(fig)
        print(f"wrote picture to {args.png}", file=out)
    return 0


register(
    Command(
        name="show",
        help="draw a mask as text (and optionally PNG / JSON) with its summary",
        description=textwrap.fill(
            "Draw MASK as a compact text picture (queries down, keys across; each character is "
            "one cell, chosen from its exact allowed area) followed by a legend and a summary "
            "(shape, slices per kind, exact area, density). Works on slices, never on an S x S "
            "matrix: a 4M-token mask draws in milliseconds.", width=92,
        ) + "\n\n" + MASK_FORMS + "\n" + KINDS_TEXT,
        epilog=textwrap.dedent(
            """\
            examples:
              maskc show                                              # MAGI-1's packed training mask
              maskc show "causal(4096) | sliding_window(4096, 256)"
              maskc show "magi_video([32] * 16, 8192)" --png video.png    # 4,194,304 tokens
              maskc show my_mask.py --slices 20 --json mask.json
              maskc show mask.json --width 100 --height 40
            """
        ),
        add_arguments=_show_arguments,
        run=_show_run,
    )
)


# ---- maskc build -------------------------------------------------------------------------------


def _build_arguments(p: argparse.ArgumentParser) -> None:
    from maskc.codegen.spec import DIRECTIONS, DTYPES, HEAD_DIMS

    p.add_argument(
        "mask", nargs="?", default=None, metavar="MASK_OR_PLAN",
        help="a MASK as for `maskc show` (expression, .py file, mask .json), or a tile plan .json "
             f"(default: {DEFAULT_MASK})",
    )
    p.add_argument("-o", "--out", default="build", metavar="DIR",
                   help="build folder; merged into when it holds a build (default: %(default)s, "
                        "the folder the runtime looks in)")
    p.add_argument("--head-dim", dest="head_dims", type=int, choices=HEAD_DIMS, nargs="+", action="extend",
                   metavar="D", help="head dim(s) to build: 64, 128, 256 (default: 128)")
    p.add_argument("--dtype", dest="dtypes", choices=DTYPES, nargs="+", action="extend", metavar="T",
                   help=f"element type(s): {', '.join(DTYPES)} (default: bf16)")
    p.add_argument("--gqa-group", dest="gqa_groups", type=positive_int, nargs="+", action="extend", metavar="G",
                   help="query heads per kv head (1: MHA; default: 1)")
    p.add_argument("--direction", dest="directions", choices=DIRECTIONS, nargs="+", action="extend", metavar="DIR",
                   help="kernel(s) to build: fwd (forward), bwd_dq, bwd_dkdv (the backward's two kernels; "
                        "default: all three)")
    p.add_argument("--softcap", action="store_true", help="build the softcap variants (attention(..., softcap>0))")
    p.add_argument("--arch", type=positive_int, default=90, metavar="SM",
                   help="CUDA compute capability to compile for (default: %(default)s, H100)")
    p.add_argument("--backend", choices=("triton", "cutlass"), default="triton",
                   help="triton: compiled by Triton (default); cutlass: the Hopper kernels (head dims 64/128, "
                        "bf16/fp16) rendered to CUDA C++ on CuTe and compiled by nvcc for sm_90a into "
                        "OUT/cutlass/ (needs nvcc and pip install nvidia-cutlass)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines on stderr")


def _cutlass_directions(target) -> tuple[str, ...]:
    """Every CUTLASS kernel for a mask; for a tile plan, those that run its tile sizes."""
    from maskc.codegen import cutlass as cg
    from maskc.tiling import TilePlan

    if not isinstance(target, TilePlan):
        return tuple(cg.TILES)
    fits = tuple(d for d, tiles in cg.TILES.items() if tiles == (target.block_q, target.block_k))
    if not fits:
        raise CLIError(f"maskc build --backend cutlass: the tile plan has {target.block_q}x{target.block_k} tiles; "
                       "the CUTLASS kernels run " + ", ".join(f"{d} {bq}x{bk}" for d, (bq, bk) in cg.TILES.items()))
    return fits


def _build_cutlass(args: argparse.Namespace, target, source: str) -> int:
    from maskc.codegen import cutlass as cg

    if args.softcap or args.gqa_groups or args.arch != 90:
        raise CLIError("maskc build --backend cutlass: --softcap is not in the CUTLASS backend, the GQA group is a "
                       "run-time argument (no --gqa-group) and the target is sm_90a (no --arch)")
    try:
        specs = cg.specs_for_mask(target, head_dims=tuple(args.head_dims or (128,)),
                                  dtypes=tuple(args.dtypes or ("bf16",)),
                                  directions=tuple(dict.fromkeys(args.directions or _cutlass_directions(target))))
        out = sys.stdout
        print(f"mask: {source}", file=out)
        print(f"building {len(specs)} CUTLASS kernel{'' if len(specs) == 1 else 's'} for {cg.ARCH} into "
              f"{os.path.join(args.out, 'cutlass')}", file=out)
        out.flush()
        manifest = cg.build(specs, args.out, progress=not args.no_progress)
    except cg.CutlassBuildError as e:
        raise CLIError(f"maskc build --backend cutlass: {e}") from None
    entries = {e["name"]: e for e in manifest["kernels"]}
    width = max(len(s.name) for s in specs)
    for spec in specs:
        e = entries[spec.name]
        print(f"  {spec.name:<{width}}  {e['compile_seconds']:6.1f} s  shared {e['shared']:>7,} B  "
              f"regs {e.get('n_regs', '?')}  spills {e.get('spill_store_bytes', '?')} B", file=out)
    print(f"manifest: {cg.manifest_path(args.out)}  (nvcc {manifest['nvcc']}, CUTLASS {manifest['cutlass']}, "
          f"{manifest['arch']})", file=out)
    return 0


def _build_run(args: argparse.Namespace) -> int:
    from maskc.codegen.build import build, is_plan_json, load_plan, specs_for_mask
    from maskc.codegen.spec import DIRECTIONS

    text = args.mask
    if text and os.path.isfile(text) and text.lower().endswith(".json") and is_plan_json(text):
        target = load_plan(text)
        source = f"{text}  (tile plan, {target.block_q}x{target.block_k} tiles for every direction)"
    else:
        target, source = mask_from_args(args)
    if args.backend == "cutlass":
        return _build_cutlass(args, target, source)
    specs = specs_for_mask(
        target,
        head_dims=tuple(args.head_dims or (128,)),
        dtypes=tuple(args.dtypes or ("bf16",)),
        gqa_groups=tuple(args.gqa_groups or (1,)),
        softcap=args.softcap,
        directions=tuple(dict.fromkeys(args.directions or DIRECTIONS)),
    )
    aligned = target.sq % 16 == 0 and target.sk % 16 == 0
    out = sys.stdout
    print(f"mask: {source}", file=out)
    print(f"building {len(specs)} kernel{'' if len(specs) == 1 else 's'} for sm_{args.arch} into {args.out}", file=out)
    out.flush()
    manifest = build(specs, args.out, arch=args.arch, progress=not args.no_progress,
                     lengths_divisible_by_16=aligned)
    entries = {(e["name"], e["specialization"]["lengths_divisible_by_16"]): e for e in manifest["kernels"]}
    width = max(len(s.name) for s in specs)
    total = 0.0
    for spec in specs:
        e = entries[(spec.name, aligned)]
        total += e["compile_seconds"]
        regs = f"  regs {e['n_regs']}" if "n_regs" in e else ""
        warn = "  (exceeds sm_90's 227 KiB: cannot launch)" if e.get("fits_shared") is False else ""
        print(f"  {spec.name:<{width}}  {e['compile_seconds']:6.2f} s  shared {e['shared']:>7,} B{regs}{warn}", file=out)
    print(f"compiled in {total:.1f} s", file=out)
    if not aligned:
        print(f"note: sq={target.sq}, sk={target.sk} are not both multiples of 16: built for lengths of any "
              f"alignment", file=out)
    path = os.path.join(args.out, "manifest.json")
    print(f"manifest: {path}  ({len(manifest['kernels'])} kernel{'' if len(manifest['kernels']) == 1 else 's'}, "
          f"Triton {manifest['triton']}, {manifest['arch']})", file=out)
    return 0


register(
    Command(
        name="build",
        help="compile the kernels a mask needs ahead of time (sm_90 cubins, no GPU needed)",
        description=textwrap.fill(
            "Compile ahead of time the FFA kernels that attention over MASK needs on an H100: one "
            "per direction (forward, dK/dV, dQ) and per head dim, dtype and GQA group asked for. "
            "The mask is data, not code: it only decides the predicate class of its partial tiles "
            "(none / rect / diag), so masks of the same class share kernels. Each kernel is rendered to DIR/src/NAME.py and compiled by "
            "Triton for the CUDA target (no GPU needed) to DIR/NAME.cubin and DIR/NAME.ptx; "
            "DIR/manifest.json lists them (a second build into DIR adds to it). The runtime uses "
            "DIR/triton-cache when $MASKC_BUILD=DIR (or ./build exists) and its Triton version "
            "matches the build's; otherwise it JIT-compiles the same sources.", width=92,
        ) + "\n\n" + MASK_FORMS + (
            '  a plan .json    a TilePlan (TilePlan.to_json(), "format": "maskc.tileplan"): its tile\n'
            "                  sizes serve all three directions, as in attention(q, k, v, plan)\n"
        ),
        epilog=textwrap.dedent(
            """\
            examples:
              maskc build "causal(4096)" -o build/ --head-dim 128
              maskc build "magi_video([8, 8], 1024)" --head-dim 64 128 --dtype bf16 fp16
              maskc build my_mask.py --gqa-group 4 --softcap -o build/
              maskc build plan.json -o build/          # a saved TilePlan
              maskc build "causal(32768)" --backend cutlass --dtype bf16 fp16   # Hopper fwd + bwd, nvcc
              MASKC_BUILD=build/ python train.py      # the runtime picks the build up
            """
        ),
        add_arguments=_build_arguments,
        run=_build_run,
    )
)


# ---- maskc plan --------------------------------------------------------------------------------


def _plan_arguments(p: argparse.ArgumentParser) -> None:
    add_mask_argument(p)
    p.add_argument("--cp", type=positive_int, default=8, metavar="N",
                   help="context-parallel ranks (default: %(default)s)")
    p.add_argument("--heads", type=positive_int, nargs=3, metavar=("HQ", "HKV", "D"),
                   help="query heads, key/value heads and head dim of the model: prices the plans and lets "
                        "the planner choose a head-parallel plan when it moves fewer bytes "
                        "(default: priced as 32 8 128, sequence split only)")
    p.add_argument("--scheme", choices=("auto", "sequence", "heads"), default=None,
                   help="force a scheme (default: auto with --heads, else sequence)")
    p.add_argument("--group-reduce", action="store_true",
                   help="let query rows move to their keys where that moves fewer bytes (GroupReduce)")
    p.add_argument("--block", type=positive_int, default=128, metavar="B",
                   help="tile size the dispatch chunks are multiples of (default: %(default)s)")
    p.add_argument("--chunk", type=positive_int, default=None, metavar="T",
                   help="tokens per dispatch chunk (default: the planner's)")
    p.add_argument("--stages", type=positive_int, default=None, metavar="K",
                   help="remote stages after the local one (default: min(cp - 1, 4))")
    p.add_argument("--tflops", type=float, default=None, metavar="T",
                   help="attention kernel TFLOP/s for the predicted times (default: the cost model's 400)")
    p.add_argument("--link-gbs", type=float, default=None, metavar="G",
                   help="per-rank link GB/s for the predicted times (default: the cost model's 100)")
    p.add_argument("--width", type=positive_int, default=64, metavar="W",
                   help="characters of the sequence picture (default: %(default)s)")
    p.add_argument("--json", metavar="OUT.json",
                   help="also save the plan (maskc.plan.Plan.from_json reads it; every rank must run the same plan)")


def _plan_run(args: argparse.Namespace) -> int:
    import time

    from .cost import Hardware, Workload, baselines, simulate
    from .plan import compile as compile_plan

    mask, source = mask_from_args(args)
    if mask.sq != mask.sk:
        raise CLIError(f"maskc plan: context parallelism plans self-attention; MASK is {mask.sq} x {mask.sk}, "
                       "not square")
    hw_kw = {k: v for k, v in (("tflops", args.tflops), ("link_gbs", args.link_gbs)) if v is not None}
    hw = Hardware(**hw_kw)
    wl = Workload(hq=args.heads[0], hkv=args.heads[1], head_dim=args.heads[2]) if args.heads else Workload()
    t0 = time.perf_counter()
    plan = compile_plan(mask, cp_size=args.cp, block=args.block, chunk=args.chunk, stages=args.stages,
                        group_reduce=args.group_reduce, workload=wl if args.heads else None, scheme=args.scheme)
    t_plan = time.perf_counter() - t0
    out = sys.stdout
    print(f"mask: {source}", file=out)
    print(f"{plan!r}  (planned in {t_plan * 1e3:.1f} ms)", file=out)
    print(plan.ascii(args.width), file=out)
    est = simulate(plan, hw, wl)
    rows = [("maskc (" + plan.scheme + ")", est)] + list(baselines(mask, args.cp, hw, wl).items())
    print(f"\ncost model: {wl.hq} query / {wl.hkv} key-value heads of {wl.head_dim}, {hw.tflops:g} TFLOP/s, "
          f"{hw.link_gbs:g} GB/s per rank (forward + backward of one attention layer)", file=out)
    print(f"{'scheme':<18} {'recv GB total':>14} {'max rank GB':>12} {'step ms':>10} {'exposed':>8}", file=out)
    for name, e in rows:
        if not e.feasible:
            print(f"{name:<18} {'-':>14} {'-':>12} {'-':>10} {'-':>8}  ({e.note})", file=out)
            continue
        print(f"{name:<18} {e.total_bytes / 1e9:>14.3f} {e.max_rank_bytes / 1e9:>12.3f} {e.step_s * 1e3:>10.2f} "
              f"{100 * e.exposed_fraction:>7.1f}%", file=out)
    if args.json:
        _write_text(args.json, plan.to_json())
        print(f"wrote plan JSON to {args.json}", file=out)
    return 0


register(
    Command(
        name="plan",
        help="plan a mask for context parallelism: dispatch, communication, cost vs ring / Ulysses",
        description=textwrap.fill(
            "Plan self-attention over MASK on N context-parallel ranks (maskc.compile): which rank holds "
            "which tokens (balanced by the exact work of each chunk), which key/value ranges each rank "
            "receives in which stage, and, given the model's heads, whether a head-parallel plan "
            "(all-to-all of heads) moves fewer bytes. Prints a picture of the dispatch, per-rank tokens, "
            "work and received tokens, and the cost model's bytes and predicted step time against ring "
            "attention (plain, zigzag), Ulysses and an all-gather split priced the same way.", width=92,
        ) + "\n\n" + MASK_FORMS,
        epilog=textwrap.dedent(
            """\
            examples:
              maskc plan                                        # MAGI-1's packed mask on 8 ranks
              maskc plan "causal(1 << 20)" --cp 16 --heads 32 8 128
              maskc plan "varlen([4096] * 64)" --cp 8 --group-reduce --json plan.json
              maskc plan "magi_video([32] * 4, 8192)" --cp 4 --tflops 427 --link-gbs 172   # 4 x H200 calibration
            """
        ),
        add_arguments=_plan_arguments,
        run=_plan_run,
    )
)


# ---- entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=textwrap.fill(
            "maskc: a compiler for attention masks. Declare a mask (builders, exact algebra, "
            "slices); maskc normalises it to canonical slices of four kinds "
            "(FULL, CAUSAL, INV_CAUSAL, BI_CAUSAL) and compiles it. "
            "Run `maskc COMMAND --help` for a command's options.", width=92,
        ),
        epilog=textwrap.dedent(
            """\
            examples:
              maskc show                                         # MAGI-1's packed training mask
              maskc show "causal(4096) | sliding_window(4096, 256)"
              maskc show "magi_video([8, 8], 1024, window=4)" --png video.png
              maskc show --help                                  # MASK forms and kinds
              maskc plan "causal(1 << 20)" --cp 16 --heads 32 8 128   # context-parallel plan and costs
            """
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {maskc.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for cmd in COMMANDS.values():
        p = sub.add_parser(
            cmd.name,
            aliases=list(cmd.aliases),
            help=cmd.help,
            description=cmd.description,
            epilog=cmd.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd)
    return parser


def error_exit(message: str, code: int = 2):
    """Print ``maskc: error: message`` to stderr and exit (status 2 by default)."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    """Run ``maskc``; returns 0 on success, raises SystemExit(2) on a user error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd = getattr(args, "_command", None)
    if cmd is None:
        parser.print_help()
        return 0
    try:
        return int(cmd.run(args) or 0)
    except (CLIError, MaskError) as e:
        error_exit(str(e))
    except BrokenPipeError:  # e.g. `maskc show | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


__all__ = [
    "COMMANDS",
    "CLIError",
    "Command",
    "DEFAULT_MASK",
    "add_mask_argument",
    "build_parser",
    "load_mask",
    "main",
    "mask_from_args",
    "mask_namespace",
    "register",
]
