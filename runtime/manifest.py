"""Finding an ahead-of-time build at run time (see `maskc.codegen.build`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

_ATTACHED: list[str] = []


def build_dir() -> Path | None:
    path = os.environ.get("MASKC_BUILD")
    if path:
        return Path(path)
    default = Path("build")
    return default if (default / "manifest.json").exists() else None


def load_manifest(path: Path | None = None) -> dict | None:
    path = path or build_dir()
    if path is None or not (Path(path) / "manifest.json").exists():
        return None
    return json.loads((Path(path) / "manifest.json").read_text())


def attach_build() -> str | None:
    """Use a matching AOT build's Triton cache for this process; returns its path or None.

    Triton keys its cache by source, options, target and its own version; a build made by the
    same Triton version for this GPU target is found there and not compiled again. A build made
    by another Triton version is ignored (the kernels are JIT-compiled from the same source).
    """
    if _ATTACHED:
        return _ATTACHED[0] or None
    man = load_manifest()
    chosen = ""
    if man is not None:
        import triton

        if man.get("triton") == triton.__version__ and "TRITON_CACHE_DIR" not in os.environ:
            cache = Path(build_dir()) / man.get("triton_cache", "triton-cache")
            if cache.is_dir():
                os.environ["TRITON_CACHE_DIR"] = str(cache.resolve())
                chosen = str(cache)
    _ATTACHED.append(chosen)
    return chosen or None
