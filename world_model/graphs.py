"""CUDA graphs of the diffusion transformer's calls in generation.

A packed call of the small model (`DiT.forward_branches`) is some 350 kernel launches, each a few
microseconds of GPU work: on an H200 one tick spends about 12 ms on the host to give the GPU about
2 ms of work. `GraphedBlocks` runs `DiT._blocks` (the network on packed inputs) from a CUDA graph
instead, one graph per call layout: the numbers of tokens, caption tokens and cached tokens, and the
self- and cross-attention masks. A maskc mask is data, but a graph bakes in the kernel's tile lists
and grid, so each mask gets its own graph; a stream meets a few dozen layouts (chunks in flight,
chunks cached, which guidance branches a tick needs, the captions' lengths) and replays them for the
rest of the video, and the graphs are kept on the model for the next video.

All graphs read their inputs from one set of buffers (the call's inputs are copied in: a dozen small
copies), each the leading rows it needs, and write their output to one buffer, copied out after each
replay; they share one memory pool and one capture stream per device for the process (cuBLAS keeps
a workspace of 32 MB for each stream it has run on). They
run one at a time on one stream and nothing they leave behind but the output is read again, so a later
graph may reuse an earlier one's scratch, and the memory the graphs hold does not grow with the number
of layouts beyond the graph objects themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_GRAPHS = 128  # layouts kept per model; past this the graphs are dropped and captured again
# one capture stream per device for the whole process: cuBLAS keeps a workspace (32 MB on Hopper) for
# every stream it has run on, for as long as the process lives
_STREAMS: dict[int, torch.cuda.Stream] = {}


def capture_stream(device) -> torch.cuda.Stream:
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    s = _STREAMS.get(index)
    if s is None:
        s = _STREAMS[index] = torch.cuda.Stream(device=index)
    return s


@dataclass
class _Buffers:
    """The static buffers graphs read their inputs from and write their output to: each graph uses the
    leading rows it needs, so graphs of every layout share one set."""
    x: torch.Tensor  # [rows, patch_dim] patch tokens
    t: torch.Tensor  # [rows] flow time per token
    pos: torch.Tensor  # [rows, 3] positions
    text: torch.Tensor  # [text_rows, text_dim] captions
    past: list  # per layer (k, v) [past_rows, kv_heads, head_dim]
    out: torch.Tensor  # [rows, patch_dim] velocity tokens

    def fits(self, rows: int, text_rows: int, past_rows: int) -> bool:
        return rows <= self.x.shape[0] and text_rows <= self.text.shape[0] and past_rows <= self.past[0][0].shape[0]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    buffers: _Buffers  # the set it was captured with (a later, larger set leaves this one to it)


class GraphedBlocks:
    """``DiT._blocks`` replayed from CUDA graphs, for inference (no autograd) on a CUDA device.

    Call it as `DiT._blocks` (``x, t_tok, pos, text, self_mask, cross_mask, past_kv``); it returns the
    velocity tokens (a fresh tensor) and None for the K/V. The first call of a layout copies its inputs
    into the shared buffers, runs the network once eagerly (kernels compiled, tile plans and work lists
    made) and captures it; later calls copy their inputs in and replay. ``reserve`` sizes the buffers
    for the largest call to come (a stream knows it), so that they are made once; a call that does not
    fit makes a larger set (the graphs captured before keep theirs). ``captures`` / ``replays`` count."""

    def __init__(self, dit):
        self.dit = dit
        self.graphs: dict[tuple, _Graph] = {}
        self.buffers: _Buffers | None = None
        self.pool = None
        self.captures = 0
        self.replays = 0

    def reserve(self, rows: int, text_rows: int, past_rows: int, device) -> None:
        """Buffers for calls of up to ``rows`` tokens, ``text_rows`` caption tokens, ``past_rows`` cached tokens."""
        if self.buffers is not None and self.buffers.fits(rows, text_rows, past_rows):
            return
        if self.buffers is not None:  # grow to cover the old set too
            rows = max(rows, self.buffers.x.shape[0])
            text_rows = max(text_rows, self.buffers.text.shape[0])
            past_rows = max(past_rows, self.buffers.past[0][0].shape[0])
        cfg = self.dit.cfg
        p = next(self.dit.parameters())
        dev, dt = torch.device(device), p.dtype
        kv = (max(past_rows, 1), cfg.kv_heads, cfg.head_dim)
        self.buffers = _Buffers(
            x=torch.zeros(rows, cfg.patch_dim, device=dev, dtype=dt), t=torch.zeros(rows, device=dev),
            pos=torch.zeros(rows, 3, device=dev, dtype=torch.long),
            text=torch.zeros(text_rows, cfg.text_dim, device=dev, dtype=dt),
            past=[(torch.zeros(kv, device=dev, dtype=dt), torch.zeros(kv, device=dev, dtype=dt)) for _ in range(cfg.depth)],
            out=torch.zeros(rows, cfg.patch_dim, device=dev, dtype=dt))

    def __call__(self, x, t_tok, pos, text, self_mask, cross_mask, past_kv=None):
        if torch.is_grad_enabled():
            raise ValueError("GraphedBlocks is for inference: call it under torch.no_grad()")
        if not x.is_cuda:
            raise ValueError(f"GraphedBlocks runs CUDA graphs: the inputs must be on a CUDA device, got {x.device}")
        rows, n_text = x.shape[0], text.shape[0]
        n_past = 0 if past_kv is None else past_kv[0][0].shape[0]
        key = (rows, n_text, n_past, x.dtype, self_mask, cross_mask)
        g = self.graphs.get(key)
        b = self.buffers if g is None else g.buffers
        if b is None or not b.fits(rows, n_text, n_past):
            self.reserve(rows, n_text, n_past, x.device)
            b = self.buffers
        b.x[:rows].copy_(x)
        b.t[:rows].copy_(t_tok)
        b.pos[:rows].copy_(pos)
        b.text[:n_text].copy_(text)
        past = None
        if past_kv is not None:
            past = [(bk[:n_past], bv[:n_past]) for bk, bv in b.past]
            for (bk, bv), (k, v) in zip(past, past_kv):
                bk.copy_(k)
                bv.copy_(v)
        if g is None:
            self._capture(key, b, (b.x[:rows], b.t[:rows], b.pos[:rows], b.text[:n_text]), self_mask, cross_mask, past)
        else:
            g.graph.replay()
            self.replays += 1
        return b.out[:rows].clone(), None

    def _capture(self, key, b: _Buffers, inputs, self_mask, cross_mask, past) -> None:
        if len(self.graphs) >= MAX_GRAPHS:  # start over: the old graphs and their pool go
            self.graphs.clear()
            self.pool = None
        stream = capture_stream(b.x.device)
        # one eager run on the capture stream first (torch's recipe runs it on a side stream): kernels,
        # tile plans, work lists and cuBLAS's workspace for the stream are made outside the capture
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.dit._blocks(*inputs, self_mask, cross_mask, past)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # capture_begin / capture_end rather than torch.cuda.graph, which also collects garbage and empties
        # the allocator's cache for every capture (tens of ms each, a few dozen captures per stream)
        with torch.cuda.stream(stream):
            graph.capture_begin(pool=self.pool)
            try:
                out, _ = self.dit._blocks(*inputs, self_mask, cross_mask, past)
                b.out[:out.shape[0]].copy_(out)
            finally:
                graph.capture_end()
        if self.pool is None:
            self.pool = graph.pool()
        graph.replay()  # the capture ran nothing: this is the call's result
        self.captures += 1
        self.graphs[key] = _Graph(graph, b)


def graphed_blocks(model) -> GraphedBlocks:
    """The model's `GraphedBlocks` (made on first use and kept on the model: the next stream of the same
    model replays the layouts the last one captured)."""
    g = getattr(model, "_graphed_blocks", None)
    if g is None or g.dit is not model.dit:
        g = GraphedBlocks(model.dit)
        model._graphed_blocks = g
    return g


def drop_graphs(model) -> None:
    """Forget the model's graphs (and their buffers and pool): the next stream captures its own, as in a
    fresh process."""
    model._graphed_blocks = None
