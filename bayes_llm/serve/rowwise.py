"""Per-row SVF: every row of one batch runs with its own blend of experts, in one forward.

All experts share the base's U and Vᵀ, so W′_r x = W x + U (σ ⊙ (s_r − 1) ⊙ (Vᵀ x)) for row r with
effective scales s_r (`scaling.compose`, factored). A forward hook on each target `nn.Linear` adds
that correction to the base layer's output; rows with the base weights (`None`) are skipped. The
model's weights are never written, so requests with different blends share one batch (and one
attention KV cache and Mamba state, whose rows are the batch rows) instead of being regrouped by
blend with the weights merged per group (`Composer`).

The hooks see every call of the module, so this works for any family whose layers call their
projections as modules: on CPU all of them; with mamba-ssm kernels, Bamba's and Jamba's inference
paths call `in_proj`/`out_proj` as modules too (only their training path reads `.weight` directly).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from bayes_llm.svf.scaling import Factors


class RowwiseSVF:
    """Hooks on the target matrices of a plain model; inactive (the exact base) outside `rows`."""

    def __init__(self, model: nn.Module, factors: Mapping[str, Factors]) -> None:
        self.factors = dict(factors)
        self._delta: dict[str, torch.Tensor] | None = None  # name → [B, rank] of σ·(s_r − 1)
        self._adapted: torch.Tensor | None = None  # indices of rows with a correction
        self._every_row = False  # one set of scales for any batch (`same`)
        self._handles = [model.get_submodule(name).register_forward_hook(self._hook(name)) for name in self.factors]

    def _hook(self, name: str):
        f = self.factors[name]

        def add_correction(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if self._delta is None:
                return output
            delta, rows = self._delta[name], self._adapted
            x = inputs[0]
            if x.shape[0] != delta.shape[0] and not self._every_row:
                raise RuntimeError(f"{name}: batch of {x.shape[0]} rows, but scales were set for {delta.shape[0]}")
            # x is [B, T, in] (prefill and the torch decode path) or [B, in] (kernel decode steps)
            shape = (-1,) + (1,) * (x.dim() - 2) + (delta.shape[1],)
            if rows is None:
                return output + ((x @ f.vh.T) * delta.view(shape)) @ f.u.T
            correction = ((x[rows] @ f.vh.T) * delta[rows].view(shape)) @ f.u.T
            return output.index_add(0, rows, correction)

        return add_correction

    @contextmanager
    def rows(self, scales: Sequence[Mapping[str, torch.Tensor] | None]) -> Iterator[None]:
        """Run the model inside with row r's effective scales `scales[r]` (None: the base weights)."""
        adapted = [r for r, s in enumerate(scales) if s is not None]
        if adapted:
            self._delta = {
                name: torch.stack([f.s * (s[name] - 1) if s is not None else torch.zeros_like(f.s) for s in scales])
                for name, f in self.factors.items()
            }
            device = next(iter(self.factors.values())).s.device  # index_add wants its index where the output is
            self._adapted = None if len(adapted) == len(scales) else torch.tensor(adapted, device=device)
        try:
            yield
        finally:
            self._delta, self._adapted = None, None

    @contextmanager
    def same(self, scales: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Run the model inside with one set of scales for every row, whatever the batch size."""
        self._delta = {name: (f.s * (scales[name] - 1))[None] for name, f in self.factors.items()}
        self._every_row = True
        try:
            yield
        finally:
            self._delta, self._every_row = None, False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
