"""Kernel registry: `KernelSpec` -> a launchable Triton kernel.

Lookup order, with the spec as the only key:
1. this process's table;
2. an ahead-of-time build (``maskc build``) named by ``$MASKC_BUILD`` or ``./build``, used when its
   manifest's Triton version matches the running Triton (the build's Triton cache is attached, so
   the kernel is not compiled again);
3. otherwise the same source is generated from the templates and JIT-compiled by Triton.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path

from maskc.codegen.render import render, source_hash
from maskc.codegen.spec import KernelSpec

_LOCK = threading.Lock()
_KERNELS: dict[KernelSpec, object] = {}


def cache_root() -> Path:
    """maskc's cache folder: ``$MASKC_CACHE``, else ``$XDG_CACHE_HOME/maskc`` (``~/.cache/maskc``)."""
    return Path(os.environ.get("MASKC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "maskc"))


def source_dir() -> Path:
    """Where rendered sources live (Triton's JIT reads source from files)."""
    path = cache_root() / "src"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _import_source(name: str, src: str, directory: Path):
    path = directory / f"{name}.py"
    if not path.exists() or path.read_text() != src:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(src)
        tmp.replace(path)
    mod_name = f"maskc_kernels_{name}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def get_kernel(spec: KernelSpec):
    """The Triton JIT function for `spec` (rendered, imported and cached once per process)."""
    fn = _KERNELS.get(spec)
    if fn is not None:
        return fn
    with _LOCK:
        fn = _KERNELS.get(spec)
        if fn is None:
            from . import manifest

            manifest.attach_build()  # point Triton's cache at an AOT build when one matches
            src = render(spec)
            module = _import_source(f"{spec.name}_{source_hash(spec)}", src, source_dir())
            fn = getattr(module, spec.name)
            _KERNELS[spec] = fn
    return fn


def loaded_specs() -> list[KernelSpec]:
    return sorted(_KERNELS)
