"""Thin fp32 SVD of every target matrix, saved as safetensors with fingerprints.

Layout of `models/svd/`: one `layer_NNN.safetensors` per decoder layer (plus `other.safetensors` for
targets outside `layers.N`), holding `<module>.U`, `.S`, `.Vh`, and `svd.json` (targets, ranks, files
and their sha256, fingerprints, errors). Matrices are decomposed and written a layer at a time, so
besides the model only one layer's factors are ever in memory.

Fingerprints: the *base* fingerprint hashes the model config and the target weights; the *SVD*
fingerprint identifies the decomposition (base fingerprint, target names, ranks), which is all a z
vector depends on. Expert files carry both.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from bayes_llm import paths
from bayes_llm.errors import UserError
from bayes_llm.io import read_json, sha256, staged_dir, write_json
from bayes_llm.svf.scaling import Factors
from bayes_llm.svf.targets import patterns_of, select_targets

MANIFEST = "svd.json"
FORMAT_VERSION = 1
# Config keys that say how a checkpoint was saved or loaded, not what the model is.
_VOLATILE_CONFIG = {"transformers_version", "dtype", "torch_dtype", "use_cache", "output_attentions"}


class SVDError(UserError):
    pass


def base_fingerprint(model: torch.nn.Module, names: Iterable[str]) -> str:
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name in sorted(names):
        weight = model.get_submodule(name).weight.detach().to(torch.float32).contiguous()
        digest.update(f"{name}:{tuple(weight.shape)}".encode())
        digest.update(weight.numpy().tobytes())
    return digest.hexdigest()


def svd_fingerprint(base: str, ranks: dict[str, int]) -> str:
    payload = {"format_version": FORMAT_VERSION, "base": base, "ranks": ranks}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def svd_factors(weight: torch.Tensor) -> Factors:
    """Thin fp32 SVD: W ≈ U diag(S) Vh with U (m×r), S (r), Vh (r×n), r = min(m, n)."""
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    return Factors(u.contiguous(), s.contiguous(), vh.contiguous())


def _layer_file(name: str) -> str:
    match = re.search(r"\blayers\.(\d+)\.", name)
    return f"layer_{int(match.group(1)):03d}.safetensors" if match else "other.safetensors"


def decompose(
    model: torch.nn.Module, targets: str | list[str], out_dir: Path = paths.SVD, progress: bool = True
) -> dict:
    """SVD of each target of `model` into `out_dir` (replaced atomically); returns the report."""
    names = select_targets(model, targets)
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_layer_file(name), []).append(name)
    matrices, files = {}, {}
    start = time.perf_counter()
    with staged_dir(out_dir) as staging, torch.no_grad():
        for file, members in tqdm(groups.items(), desc="decompose", unit="layer", disable=not progress):
            tensors = {}
            for name in members:
                weight = model.get_submodule(name).weight.detach().to(torch.float32)
                f = svd_factors(weight)
                residual = torch.linalg.norm((f.u * f.s) @ f.vh - weight)
                error = (residual / torch.linalg.norm(weight).clamp_min(1e-30)).item()
                tensors.update({f"{name}.U": f.u, f"{name}.S": f.s, f"{name}.Vh": f.vh})
                matrices[name] = {
                    "file": file,
                    "shape": list(weight.shape),
                    "rank": f.s.numel(),
                    "relative_error": error,
                }
            save_file(tensors, staging / file)
            files[file] = sha256(staging / file)
        base = base_fingerprint(model, names)
        ranks = {name: m["rank"] for name, m in matrices.items()}
        manifest = {
            "format_version": FORMAT_VERSION,
            "model_type": model.config.model_type,
            "targets": targets,
            "patterns": patterns_of(targets),
            "base_fingerprint": base,
            "svd_fingerprint": svd_fingerprint(base, ranks),
            "matrices": matrices,
            "files": files,
        }
        write_json(staging / MANIFEST, manifest)
    report = {
        "model_type": manifest["model_type"],
        "targets": targets,
        "matrices": len(matrices),
        "singular_values": sum(ranks.values()),
        "target_parameters": sum(m["shape"][0] * m["shape"][1] for m in matrices.values()),
        "seconds": round(time.perf_counter() - start, 3),
        "max_relative_error": max(m["relative_error"] for m in matrices.values()),
        "base_fingerprint": base,
        "svd_fingerprint": manifest["svd_fingerprint"],
    }
    return report


def read_manifest(svd_dir: Path = paths.SVD) -> dict:
    path = Path(svd_dir) / MANIFEST
    manifest = read_json(path, SVDError, "run `dvc repro decompose` (or `bayes-llm decompose`)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SVDError(f"{path}: format version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    return manifest


def load_factors(svd_dir: Path = paths.SVD) -> tuple[dict[str, Factors], dict]:
    """All factors (checked against the manifest's sha256) and the manifest."""
    svd_dir = Path(svd_dir)
    manifest = read_manifest(svd_dir)
    tensors: dict[str, torch.Tensor] = {}
    for file, digest in manifest["files"].items():
        path = svd_dir / file
        if not path.is_file() or sha256(path) != digest:
            state = "missing" if not path.is_file() else "modified since decomposition (sha256 differs)"
            raise SVDError(f"{path}: {state}: run `dvc checkout models/svd` or `dvc repro decompose`")
        try:
            tensors.update(load_file(path))
        except SafetensorError as error:
            raise SVDError(f"{path}: unreadable safetensors ({error})") from None
    factors = {}
    for name, info in manifest["matrices"].items():
        f = Factors(tensors[f"{name}.U"], tensors[f"{name}.S"], tensors[f"{name}.Vh"])
        if f.s.numel() != info["rank"]:
            raise SVDError(f"{svd_dir}: {name} has rank {f.s.numel()}, the manifest says {info['rank']}")
        factors[name] = f
    return factors, manifest


def check_base(model: torch.nn.Module, manifest: dict, svd_dir: Path = paths.SVD) -> None:
    """Refuse factors that were decomposed from another base."""
    missing = [name for name in manifest["matrices"] if not _has_linear(model, name)]
    if missing:
        raise SVDError(f"{svd_dir}: targets not in this model: {', '.join(missing[:3])}: run `dvc repro decompose`")
    actual = base_fingerprint(model, manifest["matrices"])
    if actual != manifest["base_fingerprint"]:
        raise SVDError(
            f"{svd_dir} was decomposed from another base (fingerprint {manifest['base_fingerprint'][:12]}, "
            f"this base {actual[:12]}): run `dvc repro decompose`"
        )


def _has_linear(model: torch.nn.Module, name: str) -> bool:
    try:
        return isinstance(model.get_submodule(name), torch.nn.Linear)
    except AttributeError:
        return False

