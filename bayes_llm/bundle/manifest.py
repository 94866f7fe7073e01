"""Versioned expert bundles: what a run publishes, and the check before anything loads one.

A bundle (`bundles/<name>/`) holds the expert z files, the dispatcher, a copy of the SVD manifest
(which matrices the experts scale, and the base and SVD fingerprints), `manifest.json` and a model
card (`README.md`). It does not hold the base: whoever loads the bundle brings the base, and
`verify` refuses a base whose fingerprint differs. The manifest lists every file with its sha256, so
a changed, missing or added file is refused too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from bayes_llm import paths
from bayes_llm.config import Params
from bayes_llm.errors import UserError
from bayes_llm.io import read_json, sha256, staged_dir, write_json
from bayes_llm.svf.decompose import MANIFEST as SVD_MANIFEST
from bayes_llm.svf.decompose import base_fingerprint, read_manifest
from bayes_llm.svf.expert import read_expert

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class BundleError(UserError):
    """A bundle that is incomplete, tampered with, or made for another base."""


def _git_revision() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _files(root: Path) -> dict[str, str]:
    """relative path → sha256 of every file under root except the manifest (a file of that name in a
    subfolder is one more file)."""
    return {
        path.relative_to(root).as_posix(): sha256(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path != root / MANIFEST
    }


def results_section(reports: Path) -> list[str]:
    """The evaluation table and gains of `reports/eval/results.md` under a heading (none if absent)."""
    results = reports / "eval" / "results.md"
    if not results.is_file():
        return []
    return ["## Evaluation (test splits, %)", "", results.read_text().split("\n", 2)[2]]


def model_card(manifest: dict, reports: Path) -> str:
    """The bundle's README.md: what it adapts, how to load it, and the evaluation it shipped with."""
    params = manifest["params"]
    lines = [
        f"# {manifest['name']} {manifest['version']}",
        "",
        "Transformer²-style SVF experts for a MambaFormer base, with the Bayesian dispatcher that picks",
        "and blends them per prompt (bayes-llm).",
        "",
        f"- Base ({manifest['model_type']}): fingerprint `{manifest['base_fingerprint'][:16]}…`; the bundle does not "
        "contain it: bring that base (`models/base` of the run).",
        f"- SVF: `{params['svf']['targets']}` matrices, mode `{params['svf']['mode']}`; experts: "
        + ", ".join(f"{domain} ({params['experts'][domain]['objective']})" for domain in manifest["experts"])
        + ".",
        f"- Dispatcher: first pass `{params['dispatch']['strategy']}`, blending "
        f"`{params['dispatch']['blending_mode']}`.",
        f"- Built from git revision `{manifest['git_revision']}`.",
        "",
        "Check it before use (every file's sha256 and the base's fingerprint):",
        "",
        "```bash",
        f"bayes-llm bundle verify bundles/{manifest['name']} --base models/base",
        "```",
        "",
    ]
    lines += results_section(reports)
    for picture in ("scores.png", "gains.png", "reliability.png"):
        lines.append(f"![{picture}](pictures/{picture})")
    return "\n".join(lines) + "\n"


def build_bundle(params: Params, models: Path = paths.MODELS, reports: Path = paths.REPORTS) -> Path:
    """Copy experts + dispatcher + SVD manifest into bundles/<name>/ with manifest and model card."""
    cfg = params.bundle
    svd = read_manifest(models / "svd")
    experts = sorted((models / "experts").glob("*.safetensors"))
    if not experts:
        raise BundleError(f"{models / 'experts'}: no experts to bundle: run `dvc repro` first")
    if not (models / "dispatcher" / "dispatcher.json").is_file():
        raise BundleError(f"{models / 'dispatcher'}: no dispatcher to bundle: run `dvc repro calibrate` first")
    summary_path = reports / "eval" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    final = paths.bundle_dir(cfg.name)
    with staged_dir(final) as staging:
        (staging / "experts").mkdir()
        for path in experts:
            expert = read_expert(path)
            if expert.base_fingerprint != svd["base_fingerprint"]:
                raise BundleError(f"{path}: trained on another base than models/svd: run `dvc repro`")
            shutil.copy2(path, staging / "experts" / path.name)
        shutil.copytree(models / "dispatcher", staging / "dispatcher")
        shutil.copy2(models / "svd" / SVD_MANIFEST, staging / SVD_MANIFEST)
        for picture in ("eval/scores.png", "eval/gains.png", "dispatch/reliability.png"):
            if (reports / picture).is_file():
                (staging / "pictures").mkdir(exist_ok=True)
                shutil.copy2(reports / picture, staging / "pictures" / Path(picture).name)
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": cfg.name,
            "version": cfg.version,
            "git_revision": _git_revision(),
            "base_fingerprint": svd["base_fingerprint"],
            "svd_fingerprint": svd["svd_fingerprint"],
            "model_type": svd.get("model_type"),
            "experts": {path.stem: f"experts/{path.name}" for path in experts},
            "dispatcher": "dispatcher/",
            "params": params.model_dump(mode="json", include={"seed", "svf", "experts", "dispatch"}),
            "metrics": summary,
        }
        (staging / "README.md").write_text(model_card(manifest, reports))
        manifest["files"] = _files(staging)
        write_json(staging / MANIFEST, manifest)
    return final


def verify(bundle: Path, base_dir: Path | None = None) -> dict:
    """The manifest, once every file matches its sha256 (and nothing is missing or added), and, with
    `base_dir`, once that base has the fingerprint the experts were trained on."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    manifest = read_json(path, BundleError, "not a bundle (build one with `dvc repro bundle`)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: format version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    # The keys the commands and the server read: a hand-edited or truncated manifest is refused by name.
    shape = {"name": str, "version": str, "base_fingerprint": str, "files": dict, "experts": dict, "params": dict}
    wrong = [key for key, kind in shape.items() if not isinstance(manifest.get(key), kind) or not manifest[key]]
    if not wrong and not isinstance(manifest["params"].get("dispatch"), dict):
        wrong = ["params.dispatch"]
    if wrong:
        raise BundleError(f"{path}: refused, missing or empty: {', '.join(wrong)} (rebuild it with `dvc repro bundle`)")
    listed, actual = manifest.get("files", {}), _files(bundle)
    problems = [f"{name}: missing" for name in sorted(set(listed) - set(actual))]
    problems += [f"{name}: not in the manifest" for name in sorted(set(actual) - set(listed))]
    problems += [f"{name}: sha256 differs (modified)" for name in sorted(set(listed) & set(actual))
                 if listed[name] != actual[name]]  # fmt: skip
    if problems:
        raise BundleError(f"{bundle}: refused, files do not match the manifest:\n  " + "\n  ".join(problems))
    strays = [domain for domain, file in manifest["experts"].items() if not isinstance(file, str) or file not in listed]
    if strays:
        raise BundleError(f"{path}: refused, experts not among the bundle's files: {', '.join(strays)}")
    for domain, file in manifest["experts"].items():
        if read_expert(bundle / file).base_fingerprint != manifest["base_fingerprint"]:
            raise BundleError(f"{bundle / file}: expert {domain} was trained on another base than the manifest says")
    if base_dir is not None:
        from bayes_llm.model.load import load_base

        model, _ = load_base(Path(base_dir))
        svd = read_manifest(bundle)
        modules = dict(model.named_modules())
        missing = [name for name in svd["matrices"] if name not in modules]
        actual_fp = None if missing else base_fingerprint(model, svd["matrices"])
        if actual_fp != manifest["base_fingerprint"]:
            raise BundleError(
                f"{bundle}: refused: made for base {manifest['base_fingerprint'][:12]}, but {base_dir} is "
                f"{'missing target matrices' if missing else actual_fp[:12]}: use the base the bundle was built on"
            )
    return manifest


def models_layout(bundle: Path, base: Path, svd: Path) -> Path:
    """A models directory (`base/ svd/ experts/ dispatcher/`, symlinks in a temporary directory) of a
    base, its SVD and a bundle's experts and dispatcher, for the inference engine. Check the bundle
    with `verify` first; the engine refuses experts trained on another base than `svd`, and factors
    decomposed from another base than `base`."""
    import tempfile

    for what, path in (("base", base), ("SVD", svd)):
        if not Path(path).is_dir():
            raise BundleError(f"{path}: no {what} directory there (the pipeline's models/{what.lower()})")
    layout = Path(tempfile.mkdtemp(prefix="bayes-llm-bundle-"))
    for name, source in (("base", base), ("svd", svd), ("experts", bundle / "experts"),
                         ("dispatcher", bundle / "dispatcher")):  # fmt: skip
        (layout / name).symlink_to(Path(source).resolve(), target_is_directory=True)
    return layout
