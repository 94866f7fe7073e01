"""Expert files: one safetensors file of z vectors (one per target matrix) plus JSON metadata.

Metadata (safetensors header, key `bayes_llm`): format version, domain, mode, max_mult, targets,
base and SVD fingerprints, training params, metrics, and `transferred_from` when the expert was
applied to a base other than the one it was trained on. Loading checks all of it against the current
decomposition; only an explicit `transfer=True` accepts another base, and then only if every target
matrix has the same rank.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from bayes_llm.errors import UserError
from bayes_llm.io import atomic_path
from bayes_llm.svf.scaling import MODES, Factors, Mode, effective_scale

FORMAT = "bayes-llm/svf-expert"
FORMAT_VERSION = 1


class ExpertFileError(UserError):
    pass


@dataclass(frozen=True)
class Expert:
    domain: str
    mode: Mode
    max_mult: float
    z: dict[str, torch.Tensor] = field(repr=False)
    base_fingerprint: str
    svd_fingerprint: str
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    transferred_from: dict[str, str] | None = None

    def scales(self, factors: Mapping[str, Factors]) -> dict[str, torch.Tensor]:
        """The effective per-singular-value scales (the space experts are blended in)."""
        with torch.no_grad():
            return {name: effective_scale(z, factors[name].s, self.mode, self.max_mult) for name, z in self.z.items()}

    def metadata(self) -> dict[str, Any]:
        meta = {k: v for k, v in asdict(self).items() if k != "z"}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "targets": list(self.z), **meta}


def save_expert(expert: Expert, path: str | Path) -> None:
    """Write atomically: a crash leaves the previous file (or none), never a truncated one."""
    tensors = {name: z.detach().to(torch.float32).contiguous() for name, z in expert.z.items()}
    # One metadata key: safetensors writes its metadata map in hash order, so two keys would make the
    # bytes (and DVC's hash) of equal experts differ between runs.
    header = {"bayes_llm": json.dumps(expert.metadata(), sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=header)


def read_expert(path: str | Path) -> Expert:
    """The file as written, without checking it against a decomposition."""
    path = Path(path)
    if not path.is_file():
        raise ExpertFileError(f"{path}: expert file not found")
    try:
        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
            names = handle.keys()  # a safe_open handle is not iterable
            z = {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError) as error:
        raise ExpertFileError(f"{path}: not a readable safetensors file, truncated or corrupt? ({error})") from None
    not_an_expert = ExpertFileError(f"{path}: a safetensors file, but not a bayes-llm SVF expert (no {FORMAT} header)")
    if "bayes_llm" not in header:
        raise not_an_expert
    try:
        meta = json.loads(header["bayes_llm"])
    except json.JSONDecodeError as error:
        raise ExpertFileError(f"{path}: expert metadata is not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise not_an_expert
    if meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version")
        raise ExpertFileError(f"{path}: expert format version {version!r}, expected {FORMAT_VERSION}")
    if meta.get("mode") not in MODES or sorted(meta.get("targets", [])) != sorted(z):
        raise ExpertFileError(f"{path}: inconsistent expert metadata (mode or targets)")
    return Expert(
        domain=meta["domain"],
        mode=meta["mode"],
        max_mult=float(meta["max_mult"]),
        z={name: z[name] for name in meta["targets"]},
        base_fingerprint=meta["base_fingerprint"],
        svd_fingerprint=meta["svd_fingerprint"],
        training=meta.get("training", {}),
        metrics=meta.get("metrics", {}),
        transferred_from=meta.get("transferred_from"),
    )


def load_expert(path: str | Path, svd_manifest: Mapping[str, Any], transfer: bool = False) -> Expert:
    """Read an expert and check it fits the decomposition `svd_manifest` (see `decompose`).

    `transfer=True` applies an expert trained on another base whose target ranks match
    (cross-model transfer); the result records where it came from in `transferred_from`.
    """
    expert = read_expert(path)
    ranks = {name: info["rank"] for name, info in svd_manifest["matrices"].items()}
    shapes = {name: z.numel() for name, z in expert.z.items()}
    if shapes != ranks or any(z.dim() != 1 for z in expert.z.values()):
        differing = sorted(set(shapes) ^ set(ranks)) or [n for n in ranks if shapes.get(n) != ranks[n]]
        raise ExpertFileError(
            f"{path}: its z vectors do not fit this decomposition (targets or ranks differ, e.g. "
            f"{', '.join(differing[:3])}): it was trained with other svf.targets or another model shape"
        )
    same_base = expert.base_fingerprint == svd_manifest["base_fingerprint"]
    same_svd = expert.svd_fingerprint == svd_manifest["svd_fingerprint"]
    if same_base and same_svd:
        return expert
    if not transfer:
        raise ExpertFileError(
            f"{path}: trained on another base (expert base {expert.base_fingerprint[:12]}, "
            f"this base {svd_manifest['base_fingerprint'][:12]}): retrain it (`dvc repro`), or load it "
            "with transfer=True to apply it across models on purpose"
        )
    return replace(
        expert,
        transferred_from={"base_fingerprint": expert.base_fingerprint, "svd_fingerprint": expert.svd_fingerprint},
        base_fingerprint=svd_manifest["base_fingerprint"],
        svd_fingerprint=svd_manifest["svd_fingerprint"],
    )
