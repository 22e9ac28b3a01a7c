"""Images and videos in and out of ``magi generate``: reading a conditioning image or a prefix video, and
writing the generated video chunk by chunk as it streams (mp4, GIF or PNG frames).

The GIF is written by `GifWriter`, frame by frame: each frame is quantized once, to its own palette, and
appended, so a video of n frames costs n quantizations. (Pillow's ``save_all`` writes a whole GIF at once:
rewriting the file after every chunk quantized every earlier frame again, 864 quantizations for 8 chunks,
6.7 s of the README's 8-chunk video on an H200's host against 1.4 s of generating it.)
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np


def _has_imageio_ffmpeg() -> bool:
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return False
    return True


def read_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 [H, W, 3] RGB of an image file (Pillow)."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"image file {str(p)!r} does not exist")
    try:
        with Image.open(p) as im:
            mode = im.mode
            if mode not in ("RGB", "RGBA", "P", "L"):
                raise ValueError(f"image {str(p)!r} has mode {mode}; give an RGB image")
            a = np.asarray(im.convert("RGB"))
    except OSError as e:
        raise ValueError(f"cannot read image {str(p)!r}: {e}") from None
    return a


def read_video(path: str | os.PathLike) -> np.ndarray:
    """uint8 [T, H, W, 3] frames of a GIF (Pillow), an mp4 (imageio-ffmpeg), or a folder of PNG frames."""
    p = Path(path)
    if p.is_dir():
        from PIL import Image

        files = sorted(p.glob("*.png"))
        if not files:
            raise ValueError(f"video folder {str(p)!r} holds no .png frames")
        return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    if not p.is_file():
        raise ValueError(f"video file {str(p)!r} does not exist")
    if p.suffix.lower() == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(p) as im:
            return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
    if not _has_imageio_ffmpeg():
        raise ValueError(f"reading {p.suffix or 'this'} video needs imageio + imageio-ffmpeg (not installed); "
                         "give a .gif or a folder of .png frames")
    import imageio

    return np.stack([np.asarray(f)[..., :3] for f in imageio.get_reader(str(p))])


# ------------------------------------------------------------------------------------------- GIF

_TRAILER = b"\x3b"


def _skip_sub_blocks(data: bytes, i: int) -> int:
    """The index just past a run of GIF data sub-blocks (length byte, bytes; a zero length ends it)."""
    while data[i]:
        i += data[i] + 1
    return i + 1


def _gif_image_block(frame: np.ndarray) -> bytes:
    """One RGB frame as a GIF image block with its own (local) palette: the image descriptor, the
    palette, and the LZW-coded indices, as Pillow codes a one-frame GIF of it (adaptive palette)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="GIF")
    data = buf.getvalue()
    packed = data[10]
    i = 13
    global_table = b""
    if packed & 0x80:  # Pillow puts a one-frame GIF's palette in the global table
        n = 3 << ((packed & 7) + 1)
        global_table, i = data[13:13 + n], 13 + n
    while data[i] == 0x21:  # extensions (Pillow writes none for an opaque frame; skipped if it does)
        i = _skip_sub_blocks(data, i + 2)
    if data[i] != 0x2C:
        raise RuntimeError(f"unexpected GIF block 0x{data[i]:02x} in Pillow's one-frame GIF")
    desc = bytearray(data[i:i + 10])
    body = i + 10
    if not desc[9] & 0x80:  # no local palette: the global one becomes local, with the same size bits
        if not global_table:
            raise RuntimeError("Pillow's one-frame GIF has no palette")
        desc[9] = (desc[9] & 0x40) | 0x80 | (packed & 7)  # keep interlacing; local table, its size
    else:
        global_table = b""  # the frame brings its own
    own_table = 3 << ((data[i + 9] & 7) + 1) if data[i + 9] & 0x80 else 0
    end = _skip_sub_blocks(data, body + own_table + 1)  # past the palette, the LZW code size, the data
    return bytes(desc) + global_table + data[body:end]


class GifWriter:
    """An animated GIF written frame by frame (`append`), at ``fps`` (each frame's delay in hundredths
    of a second, rounded so the frames keep the clock: 4, 4, 5, 4, 4, 4, ... at 24 fps) and looping.

    Every append writes its frames over the file's one-byte trailer and ends it again, so between
    appends the file is a complete GIF of the frames so far; ``close`` closes the file."""

    def __init__(self, path: str | os.PathLike, fps: int = 24):
        if not (isinstance(fps, int) and fps >= 1):
            raise ValueError(f"GifWriter: fps must be an integer >= 1, got {fps!r}")
        self.path, self.fps, self.frames_written = Path(path), fps, 0
        self._file = None
        self._size: tuple[int, int] | None = None

    def _delay(self, n: int) -> int:
        """Hundredths of a second that frame n shows: the clock at frame n + 1 less the clock at frame n."""
        return (100 * (n + 1) + self.fps // 2) // self.fps - (100 * n + self.fps // 2) // self.fps

    def _open(self, height: int, width: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "wb")
        self._size = (height, width)
        # header; logical screen (no global palette); loop forever (the NETSCAPE2.0 extension); trailer
        self._file.write(b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0))
        self._file.write(b"\x21\xff\x0bNETSCAPE2.0\x03\x01" + struct.pack("<H", 0) + b"\x00" + _TRAILER)

    def append(self, frames: np.ndarray) -> None:
        """Append uint8 RGB frames [T, H, W, 3] (the size of the first ones)."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"GifWriter.append: frames must be uint8 [T, H, W, 3], got {frames.dtype} "
                             f"{list(frames.shape)}")
        if self._file is None:
            if not 1 <= frames.shape[1] <= 0xFFFF or not 1 <= frames.shape[2] <= 0xFFFF:
                raise ValueError(f"GifWriter.append: frame size {frames.shape[1]}x{frames.shape[2]} is not a GIF's")
            self._open(frames.shape[1], frames.shape[2])
        elif frames.shape[1:3] != self._size:
            raise ValueError(f"GifWriter.append: frames of {frames.shape[1]}x{frames.shape[2]} after "
                             f"{self._size[0]}x{self._size[1]} ones; a GIF's frames share one size")
        # per frame: a graphic control block (keep the frame, disposal 1; its delay; no transparency), the image
        blocks = [b"\x21\xf9\x04\x04" + struct.pack("<H", self._delay(self.frames_written + k)) + b"\x00\x00"
                  + _gif_image_block(f) for k, f in enumerate(frames)]
        self._file.seek(-1, os.SEEK_END)  # over the trailer
        self._file.write(b"".join(blocks) + _TRAILER)
        self._file.flush()
        self.frames_written += len(frames)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class VideoWriter:
    """Appends chunks to ``out`` as they come: mp4 (imageio-ffmpeg), else GIF (`GifWriter`), else PNG frames.

    ``.mp4`` without imageio-ffmpeg falls back to a ``.gif`` beside it; a path without a video
    suffix is a folder of PNG frames. Between chunks the file is a playable video of the chunks so
    far (the GIF always; the mp4 once closed). ``format`` and ``path`` say what is written."""

    def __init__(self, out: str | os.PathLike, fps: int = 24):
        out = Path(out)
        self.fps, self.frames_written = fps, 0
        suffix = out.suffix.lower()
        if suffix == ".mp4" and _has_imageio_ffmpeg():
            import imageio

            self.format, self.path = "mp4", out
            out.parent.mkdir(parents=True, exist_ok=True)
            self._w = imageio.get_writer(str(out), fps=fps, macro_block_size=1)
        elif suffix in (".mp4", ".gif"):
            self.format, self.path = "gif", out.with_suffix(".gif")
            self.fallback = suffix == ".mp4"
            self._w = GifWriter(self.path, fps)
        else:
            self.format, self.path = "png", out
            out.mkdir(parents=True, exist_ok=True)

    def append(self, frames: np.ndarray) -> None:
        if self.format == "mp4":
            for f in frames:
                self._w.append_data(f)
        elif self.format == "gif":
            self._w.append(frames)
        else:
            from PIL import Image

            for i, f in enumerate(frames):
                Image.fromarray(f).save(self.path / f"frame_{self.frames_written + i:05d}.png")
        self.frames_written += len(frames)

    def close(self) -> None:
        if self.format in ("mp4", "gif"):
            self._w.close()
