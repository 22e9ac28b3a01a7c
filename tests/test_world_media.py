"""The world model's media I/O (`maskc.world_model.media`): the streaming GIF writer and the readers."""

import numpy as np
import pytest
from PIL import Image, ImageSequence

from maskc.world_model import media


def few_colour_frames(n: int, seed: int, size=(64, 64)) -> np.ndarray:
    """Frames of at most 4 colours each (a palette of them is exact), different colours per frame."""
    rng = np.random.default_rng(seed)
    frames = np.empty((n, *size, 3), np.uint8)
    for i in range(n):
        palette = rng.integers(0, 256, (4, 3), dtype=np.uint8)
        frames[i] = palette[rng.integers(0, 4, size)]
    return frames


def gif_frames(path) -> tuple[np.ndarray, list[int], dict]:
    with Image.open(path) as im:
        info = dict(im.info)
        frames, durations = [], []
        for f in ImageSequence.Iterator(im):
            frames.append(np.asarray(f.convert("RGB")))
            durations.append(f.info["duration"])
    return np.stack(frames), durations, info


def test_gif_writer_streams_exact_frames(tmp_path):
    """Frames come back exactly (at most 256 colours each), after every append the file is a complete GIF
    of the frames so far, and the delays keep a 24 fps clock (4, 4, 5, 4, 4, 4 hundredths...), looping."""
    path = tmp_path / "v.gif"
    w = media.GifWriter(path, fps=24)
    chunks = [few_colour_frames(24, 0), few_colour_frames(5, 1), few_colour_frames(24, 2)]
    chunks[1][3] = chunks[1][2]  # two equal frames in a row stay two frames
    for k, chunk in enumerate(chunks):
        w.append(chunk)
        got, durations, info = gif_frames(path)
        want = np.concatenate(chunks[:k + 1])
        assert got.shape == want.shape and np.array_equal(got, want)
        assert w.frames_written == len(want)
    w.close()
    assert info.get("loop") == 0
    assert durations[:12] == [40, 40, 50, 40, 40, 40] * 2
    clock = np.cumsum(durations) // 10  # hundredths of a second shown by the end of each frame
    assert np.array_equal(clock, (100 * np.arange(1, len(durations) + 1) + 12) // 24)  # never off by 1/200 s
    assert sum(durations[:24]) == 1000 and sum(durations[24:48]) == 1000  # one second per 24 frames
    # the file ends with the trailer once, and a reader as strict as Pillow's sees nothing after it
    assert path.read_bytes()[-1:] == b"\x3b"


def test_gif_writer_many_colours_and_one_quantization_per_frame(tmp_path, monkeypatch):
    """A frame of more than 256 colours is quantized (close, not exact), and each frame is coded once:
    a longer video costs proportionally more, not quadratically (the old writer rewrote every frame)."""
    coded = []
    block = media._gif_image_block
    monkeypatch.setattr(media, "_gif_image_block", lambda f: coded.append(1) or block(f))
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:64, 0:64]
    smooth = np.stack([y * 4, x * 4, (x + y) * 2], -1).astype(np.uint8)  # 4096 colours
    frames = np.stack([np.clip(smooth.astype(int) + rng.integers(-3, 4, smooth.shape), 0, 255).astype(np.uint8)
                       for _ in range(6)])
    w = media.GifWriter(tmp_path / "m.gif", fps=10)
    for i in range(0, 6, 2):
        w.append(frames[i:i + 2])
    w.close()
    assert len(coded) == 6
    got, durations, _ = gif_frames(tmp_path / "m.gif")
    assert got.shape == frames.shape and durations == [100] * 6
    assert np.abs(got.astype(int) - frames).mean() < 4.0


def test_gif_writer_bad_input(tmp_path):
    with pytest.raises(ValueError, match="fps must be an integer >= 1"):
        media.GifWriter(tmp_path / "a.gif", fps=0)
    w = media.GifWriter(tmp_path / "a.gif")
    with pytest.raises(ValueError, match=r"uint8 \[T, H, W, 3\]"):
        w.append(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"uint8 \[T, H, W, 3\]"):
        w.append(np.zeros((8, 8, 3), np.uint8))
    assert not (tmp_path / "a.gif").exists()  # nothing written before a good append
    w.append(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="share one size"):
        w.append(np.zeros((1, 8, 9, 3), np.uint8))
    w.close()
    assert gif_frames(tmp_path / "a.gif")[0].shape == (1, 8, 8, 3)
    w.close()  # twice is fine


def test_video_writer_formats(tmp_path):
    """VideoWriter: a GIF by name, PNG frames for a path without a video suffix; the readers read both back."""
    frames = few_colour_frames(3, 4, (16, 16))
    gif = media.VideoWriter(tmp_path / "v.gif")
    gif.append(frames[:2])
    gif.append(frames[2:])
    gif.close()
    assert gif.format == "gif" and gif.frames_written == 3
    assert np.array_equal(media.read_video(tmp_path / "v.gif"), frames)
    png = media.VideoWriter(tmp_path / "frames")
    png.append(frames)
    png.close()
    assert png.format == "png" and np.array_equal(media.read_video(tmp_path / "frames"), frames)
    with pytest.raises(ValueError, match="does not exist"):
        media.read_video(tmp_path / "none.gif")
    with pytest.raises(ValueError, match="does not exist"):
        media.read_image(tmp_path / "none.png")
