"""The Bayesian controller: prior × first-pass likelihood (tempered) → posterior → expert blend or base.

Labels are the expert domains plus `other`. The posterior is softmax(log prior + loglik / T). The
blend is the posterior restricted to the domains, reduced by the blending mode; when `other` is the
most probable label, or no domain reaches `threshold`, the answer uses the **base** weights (the
official code keeps whatever expert was loaded last in that case).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from bayes_llm.svf.blend import BlendMode, blend_weights

OTHER = "other"


@dataclass(frozen=True)
class Controller:
    labels: tuple[str, ...]  # the domains, then OTHER
    log_prior: tuple[float, ...]
    temperature: float = 1.0
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if not self.labels or self.labels[-1] != OTHER or OTHER in self.labels[:-1]:
            raise ValueError(f"labels must be the domains followed by {OTHER!r}, got {self.labels}")
        if len(self.log_prior) != len(self.labels):
            raise ValueError(f"{len(self.log_prior)} prior values for {len(self.labels)} labels")
        if not self.temperature > 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")

    @property
    def domains(self) -> tuple[str, ...]:
        return self.labels[:-1]

    @classmethod
    def with_prior(cls, domains: Sequence[str], prior: Mapping[str, float] | None = None, **kwargs) -> Controller:
        """`prior`: weights per domain (e.g. train rows); None: uniform. `other` gets 1/len(labels)."""
        labels = (*domains, OTHER)
        share = 1.0 / len(labels)
        if prior is None:
            probs = [share] * len(labels)
        else:
            total = sum(prior[d] for d in domains)
            probs = [(1 - share) * prior[d] / total for d in domains] + [share]
        return cls(labels, tuple(math.log(p) for p in probs), **kwargs)

    def posterior(self, logliks: torch.Tensor) -> torch.Tensor:
        """[n, labels] likelihoods (log) → [n, labels] posterior probabilities."""
        if logliks.shape[-1] != len(self.labels):
            raise ValueError(f"likelihoods over {logliks.shape[-1]} labels, the controller has {len(self.labels)}")
        prior = torch.tensor(self.log_prior, dtype=torch.float64)
        return torch.softmax(prior + logliks.double() / self.temperature, dim=-1)

    def route(self, posterior: torch.Tensor) -> str:
        """The label one prompt is routed to: a domain, or OTHER (→ base weights)."""
        best = int(posterior.argmax())
        if self.labels[best] == OTHER or float(posterior[best]) < self.threshold:
            return OTHER
        return self.labels[best]

    def blend(self, posterior: torch.Tensor, mode: BlendMode = "weighted_average", top_k: int = 2) -> dict[str, float]:
        """Expert weights for one prompt; {} means the base weights."""
        if self.route(posterior) == OTHER:
            return {}
        weights = {d: float(p) for d, p in zip(self.domains, posterior[:-1], strict=True)}
        return blend_weights(weights, mode, top_k)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> Controller:
        return cls(tuple(data["labels"]), tuple(data["log_prior"]), data["temperature"], data["threshold"])
