"""A training step replayed from one CUDA graph: `GraphedStep`.

The pretrain trainer's `--cuda_graph` wraps its optimizer step (the micro-batches' forward and backward, clipping,
AdamW, the balancing bias update) in one: after `warmup` eager steps it captures a step, then every later step is
the inputs copied into the captured ones and one replay. The host then launches one graph a step instead of
thousands of kernels, so a step costs the GPU's time whatever the host's speed (the 1.26B model: benchmarks/
RESULTS.md). What the step needs for that: static shapes, no host sync (the fused experts and the chunked loss have
none), and values that change between steps read from device tensors (AdamW capturable, its learning rate a tensor
the scheduler writes in place).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["GraphedStep"]


class GraphedStep:
    """`step(inputs)` (inputs and outputs: tensors in lists, tuples and dicts) run eagerly `warmup` times, then
    captured once in a CUDA graph and replayed for every later call with the call's inputs copied into the captured
    ones. The outputs of a replay are the captured tensors, overwritten by the next replay: read them (or copy them)
    before the next call. Gradients the step leaves set to None stay None between replays, in the graph's memory."""

    def __init__(self, step: Callable, warmup: int = 2):
        if warmup < 1:  # the eager steps compile, tune and allocate what a capture must not
            raise ValueError(f"warmup must be >= 1 eager step before the capture, got {warmup}")
        self.step, self.warmup = step, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs = self.static_outputs = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, inputs):
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            return self.step(inputs)
        if self.graph is None:
            self._capture(inputs)
        else:
            self._copy_in(inputs)
        self.graph.replay()
        return self.static_outputs

    def _capture(self, inputs):
        leaves, _ = tree_flatten(inputs)
        if not leaves or not all(isinstance(t, torch.Tensor) and t.is_cuda for t in leaves):
            raise ValueError("GraphedStep captures steps whose inputs are CUDA tensors")
        self.static_inputs = tree_map(torch.Tensor.clone, inputs)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records, runs nothing: the replay that follows runs this step
            self.static_outputs = self.step(self.static_inputs)

    def _copy_in(self, inputs):
        (new, spec), (static, static_spec) = tree_flatten(inputs), tree_flatten(self.static_inputs)
        if spec != static_spec or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(new, static)):
            raise ValueError(
                "a CUDA-graphed step takes inputs of the captured step's structure, shapes and dtypes; captured "
                f"{[(tuple(t.shape), t.dtype) for t in static]}, got {[(tuple(t.shape), t.dtype) for t in new]}"
            )
        for destination, source in zip(static, new):
            destination.copy_(source, non_blocking=True)
