"""Checkpoints of the world model: safetensors files with the configs inside.

A checkpoint is one ``.safetensors`` file (``path``) holding

- every tensor of ``WorldModel.state_dict()`` (autoencoder, caption encoder, transformer, and the
  autoencoder's latent normalisation buffers) under its state-dict name;
- string metadata: ``format`` (`FORMAT`), ``model_config`` (JSON of `ModelConfig.to_dict`),
  ``train_config`` (JSON of the training config, or ``null``), ``step`` (training steps done),
  ``meta`` (JSON of any further facts, e.g. the training phase) and ``optimizer_file`` (the name
  of the optimizer file beside it, or empty).

Optimizer state (what an exact resume needs, and what a shipped model does not) goes into a
second safetensors file beside it, `optimizer_path(path)` = ``<stem>.optim.safetensors``: every
tensor of ``optimizer.state_dict()["state"]`` as ``state.<param index>.<name>`` (AdamW: ``step``,
``exp_avg``, ``exp_avg_sq``), non-tensor state values and the ``param_groups`` as JSON metadata.
No pickle is involved: loading a checkpoint never runs code from the file.

Everything round-trips bit-exactly: `load_checkpoint` rebuilds the model from the stored config and
copies the stored bytes into it; `load_optimizer_state` restores the optimizer's moments and step
counts. Files are written to a temporary name and renamed, so an interrupted save never leaves a
truncated checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .configs import ModelConfig

FORMAT = "maskc.world_model.checkpoint/1"
OPTIM_FORMAT = "maskc.world_model.optimizer/1"
OPTIM_SUFFIX = ".optim.safetensors"
_RESERVED = {"format", "model_config", "train_config", "step", "optimizer_file", "optimizer", "path"}


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("world-model checkpoints need the 'safetensors' package: pip install safetensors") from e
    return st


def optimizer_path(path: str | os.PathLike) -> Path:
    """Where the optimizer state of checkpoint ``path`` lives: ``<dir>/<stem>.optim.safetensors``."""
    p = Path(path)
    name = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.name
    return p.with_name(name + OPTIM_SUFFIX)


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    st = _safetensors()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    st.save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)  # safetensors creates the file owner-only
    os.replace(tmp, path)


def _cpu_contiguous(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = t.detach()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to("cpu").contiguous().clone()  # clone: no storage shared between entries


# ------------------------------------------------------------------------------------ optimizer


def save_optimizer_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer, meta: dict | None = None) -> Path:
    """Write ``optimizer.state_dict()`` to ``path`` (safetensors + JSON metadata); returns the path."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            key = f"state.{int(idx)}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = _cpu_contiguous(value)
            else:
                scalars[key] = value
    metadata = {
        "format": OPTIM_FORMAT,
        "optimizer": type(optimizer).__name__,
        "param_groups": json.dumps(sd["param_groups"]),
        "scalars": json.dumps(scalars),
        "meta": json.dumps(meta or {}),
    }
    path = Path(path)
    _atomic_save(tensors, metadata, path)
    return path


def read_optimizer_state(path: str | os.PathLike) -> tuple[dict, dict]:
    """(an ``optimizer.state_dict()``-shaped dict, the stored meta) from an optimizer file."""
    _safetensors()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"optimizer state file {str(path)!r} does not exist")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
        if md.get("format") != OPTIM_FORMAT:
            raise ValueError(f"{str(path)!r} is not a world-model optimizer file (format {md.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(json.loads(md["scalars"]).items()):
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    groups = json.loads(md["param_groups"])
    for g in groups:  # JSON turned the hyper-parameter tuples (AdamW's betas) into lists
        for k, v in g.items():
            if k != "params" and isinstance(v, list):
                g[k] = tuple(v)
    return {"state": state, "param_groups": groups}, json.loads(md.get("meta", "{}"))


def load_optimizer_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer) -> dict:
    """Restore ``optimizer`` from an optimizer file (tensors move to the parameters' devices); returns its meta."""
    sd, meta = read_optimizer_state(path)
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    n_saved = sum(len(g["params"]) for g in sd["param_groups"])
    if n_params != n_saved or len(sd["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"optimizer file {str(path)!r} holds {n_saved} parameters in {len(sd['param_groups'])} "
                         f"groups; this optimizer has {n_params} in {len(optimizer.param_groups)}")
    optimizer.load_state_dict(sd)
    return meta


# ---------------------------------------------------------------------------------------- model


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, *, step: int = 0,
                    train_config: dict | None = None, optimizer: torch.optim.Optimizer | None = None,
                    meta: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a checkpoint of ``model`` (a `WorldModel`) to ``path``; returns the path.

    ``train_config``: the training config as a JSON-able dict; ``optimizer``: also write its state
    to `optimizer_path(path)` (otherwise any stale optimizer file there is removed); ``meta``:
    extra JSON-able facts, returned by `load_checkpoint` in its meta dict; ``dtype``: store floating
    weights in this dtype (e.g. ``torch.bfloat16`` to halve a shipped file; not bit-exact then).
    """
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"save_checkpoint needs a model with a ModelConfig .cfg (a WorldModel), got {type(model).__name__}")
    meta = dict(meta or {})
    bad = sorted(set(meta) & _RESERVED)
    if bad:
        raise ValueError(f"save_checkpoint: meta keys {bad} are reserved")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    path = Path(path)
    opt_path = optimizer_path(path)
    if optimizer is not None:
        save_optimizer_state(opt_path, optimizer, {"step": step, **meta})
    elif opt_path.exists():
        opt_path.unlink()
    tensors = {k: _cpu_contiguous(v, dtype) for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "model_config": json.dumps(cfg.to_dict()),
        "train_config": json.dumps(train_config),
        "step": str(step),
        "meta": json.dumps(meta),
        "optimizer_file": opt_path.name if optimizer is not None else "",
    }
    _atomic_save(tensors, metadata, path)
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig, dict]:
    """The raw tensors (CPU), the model config and the meta dict of a checkpoint, without building a model."""
    _safetensors()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if md.get("format") != FORMAT:
                raise ValueError(f"{str(path)!r} is not a world-model checkpoint (format {md.get('format')!r}, "
                                 f"expected {FORMAT!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {e}") from None
    cfg = ModelConfig.from_dict(json.loads(md["model_config"]))
    opt_name = md.get("optimizer_file", "")
    opt = path.with_name(opt_name) if opt_name else None
    meta = dict(json.loads(md.get("meta", "{}")))
    meta.update({
        "format": md["format"],
        "step": int(md["step"]),
        "train_config": json.loads(md.get("train_config", "null")),
        "optimizer": str(opt) if opt is not None and opt.is_file() else None,
        "path": str(path),
    })
    return tensors, cfg, meta


def stores_bf16(path: str | os.PathLike) -> bool:
    """Whether a checkpoint stores any tensor in bfloat16 (the shipped file does); reads the header only."""
    _safetensors()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32):
    """``(model, cfg, meta)``: a `WorldModel` rebuilt from the stored config with the stored weights.

    ``meta`` holds ``step``, ``train_config`` (dict or None), ``optimizer`` (path of the optimizer
    file, or None), ``format``, ``path`` and the extra keys given to `save_checkpoint`. Weights are
    cast to ``dtype`` (float32: bit-exact for a float32 checkpoint) on ``device``.
    """
    from .dit import WorldModel

    tensors, cfg, meta = read_checkpoint(path)
    model = WorldModel(cfg)
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(path)!r} does not match its config {cfg.name!r}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise ValueError(f"checkpoint {str(path)!r}: {k} has shape {tuple(v.shape)}, the config needs "
                             f"{tuple(want[k].shape)}")
    model.load_state_dict({k: v.to(want[k].dtype) for k, v in tensors.items()})
    model = model.to(device=device, dtype=dtype)
    return model, cfg, meta
