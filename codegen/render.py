"""Render a `KernelSpec` to Triton source from the jinja2 templates (unused branches removed)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import jinja2

from .spec import KernelSpec

TEMPLATES = Path(__file__).parent / "templates"
_FILES = {"fwd": "ffa_fwd.py.j2", "bwd_dkdv": "ffa_bwd_dkdv.py.j2", "bwd_dq": "ffa_bwd_dq.py.j2"}


@functools.lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=False,
        lstrip_blocks=False,
    )


@functools.lru_cache(maxsize=256)
def render(spec: KernelSpec) -> str:
    """Triton source of the kernel for `spec`; its function is named ``spec.name``."""
    return _env().get_template(_FILES[spec.direction]).render(spec=spec)


def source_hash(spec: KernelSpec) -> str:
    return hashlib.sha256(render(spec).encode()).hexdigest()[:16]
