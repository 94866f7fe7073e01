"""The SVF weight map W′ = U diag(σ·z) Vᵀ: training through a parametrization, inference by merging.

W′ is computed as W + U diag(σ·(s − 1)) Vᵀ, where s is the effective scale of each singular value.
That equals U diag(σ·s) Vᵀ up to the SVD's own error (≤ 1e-5, see `decompose`) and makes s = 1 give
W bit for bit. Two ways to get s from the trainable vector z:

- `scale`: s = z, identity at z = 1.
- `official` (Transformer²'s code): s = sigmoid(z)·max_mult, rescaled so that Σσ is unchanged;
  identity at z = logit(1/max_mult), bit-exact for the default max_mult = 2 (z = 0).

Training (`attach`) registers a `torch.nn.utils.parametrize` parametrization on each target weight
with z as the only trainable tensor, and composes W′ once per `forward` / `generate` call (not per
weight access). Inference (`Composer`) writes composed weights into the plain model (`merge`) and
copies the base back (`unmerge`), both exact, so generation runs at base speed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Literal, NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

Mode = Literal["scale", "official"]
MODES: tuple[Mode, ...] = ("scale", "official")


class Factors(NamedTuple):
    """Thin SVD of one weight: W ≈ u @ diag(s) @ vh."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor


def effective_scale(z: torch.Tensor, sigma: torch.Tensor, mode: Mode, max_mult: float = 2.0) -> torch.Tensor:
    """The factor each singular value is multiplied by."""
    if mode == "scale":
        return z
    if mode == "official":
        mult = torch.sigmoid(z) * max_mult
        # Keep the sum of singular values, as the official compose_new_params does.
        return mult * (sigma.sum() / (sigma * mult).sum())
    raise ValueError(f"unknown SVF mode {mode!r}; modes: {', '.join(MODES)}")


def identity_z(rank: int, mode: Mode, max_mult: float = 2.0) -> torch.Tensor:
    """The z that leaves the weight unchanged."""
    if mode == "scale":
        return torch.ones(rank)
    return torch.full((rank,), math.log(1.0 / (max_mult - 1.0)))  # logit(1/max_mult)


def compose(weight: torch.Tensor, factors: Factors, scale: torch.Tensor) -> torch.Tensor:
    return weight + (factors.u * (factors.s * (scale - 1))) @ factors.vh


class SingularValueScaling(nn.Module):
    """Parametrization of one `weight`: z is its only parameter; U, σ, Vᵀ are frozen buffers."""

    def __init__(self, factors: Factors, z: torch.Tensor, mode: Mode, max_mult: float) -> None:
        super().__init__()
        # Not persistent: a state_dict carries z, never the (large, re-derivable) factors.
        self.register_buffer("u", factors.u, persistent=False)
        self.register_buffer("s", factors.s, persistent=False)
        self.register_buffer("vh", factors.vh, persistent=False)
        self.z = nn.Parameter(z.clone().to(factors.s.dtype))
        self.mode = mode
        self.max_mult = max_mult

    def scale(self) -> torch.Tensor:
        return effective_scale(self.z, self.s, self.mode, self.max_mult)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return compose(weight, Factors(self.u, self.s, self.vh), self.scale())


def _cached(method):
    @functools.wraps(method)
    def call(*args, **kwargs):
        with parametrize.cached():
            return method(*args, **kwargs)

    return call


class SVF:
    """SVF attached to a model for training: `parameters()` are the z vectors, nothing else trains."""

    def __init__(
        self,
        model: nn.Module,
        factors: Mapping[str, Factors],
        mode: Mode = "scale",
        max_mult: float = 2.0,
        z: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown SVF mode {mode!r}; modes: {', '.join(MODES)}")
        if mode == "official" and max_mult <= 1.0:
            raise ValueError(f"official mode needs max_mult > 1 (got {max_mult})")
        self.model, self.mode, self.max_mult = model, mode, max_mult
        self.names = list(factors)
        self._trainable = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        self.modules: dict[str, SingularValueScaling] = {}
        for name, f in factors.items():
            start = z[name] if z is not None else identity_z(f.s.numel(), mode, max_mult)
            if start.shape != f.s.shape:
                raise ValueError(f"z for {name} has shape {tuple(start.shape)}, the SVD rank is {f.s.numel()}")
            module = model.get_submodule(name)
            scaling = SingularValueScaling(f, start, mode, max_mult)
            parametrize.register_parametrization(module, "weight", scaling)
            module.parametrizations.weight.original.requires_grad_(False)
            self.modules[name] = scaling
        # Compose W′ once per call: without the cache every weight access recomposes (2-6x slower).
        model.forward = _cached(model.forward)
        if hasattr(model, "generate"):
            model.generate = _cached(model.generate)

    def parameters(self) -> list[nn.Parameter]:
        return [m.z for m in self.modules.values()]

    def z(self) -> dict[str, torch.Tensor]:
        return {name: m.z.detach().clone() for name, m in self.modules.items()}

    def load_z(self, z: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, m in self.modules.items():
                m.z.copy_(z[name])

    def scales(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {name: m.scale().clone() for name, m in self.modules.items()}

    def parameter_count(self) -> int:
        return sum(m.z.numel() for m in self.modules.values())

    def detach(self, merge: bool = False) -> None:
        """Remove SVF: the model gets back W (or, with `merge`, keeps W′ as plain weights)."""
        for name in self.names:
            parametrize.remove_parametrizations(self.model.get_submodule(name), "weight", leave_parametrized=merge)
        for attribute in ("forward", "generate"):
            self.model.__dict__.pop(attribute, None)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._trainable.get(name, False))
        self.modules = {}


class Composer:
    """Swap composed weights into a plain (unparametrized) model and back, exactly.

    Keeps one copy of the target weights (the base); `compose` results can be cached by the caller
    per blend and loaded with `load`.
    """

    def __init__(self, model: nn.Module, factors: Mapping[str, Factors]) -> None:
        self.model, self.factors = model, dict(factors)
        self.base = {name: model.get_submodule(name).weight.detach().clone() for name in self.factors}

    def compose(self, scales: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {name: compose(self.base[name], f, scales[name]) for name, f in self.factors.items()}

    def load(self, weights: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name in self.factors:
                self.model.get_submodule(name).weight.copy_(weights[name])

    def merge(self, scales: Mapping[str, torch.Tensor]) -> None:
        self.load(self.compose(scales))

    def unmerge(self) -> None:
        self.load(self.base)
