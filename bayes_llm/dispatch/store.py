"""The dispatcher directory (`models/dispatcher/`): calibrated controllers per first-pass strategy
and the classification expert.

`dispatcher.json` holds the format version, the base and SVD fingerprints, the expert domains it
was calibrated for, and one controller (labels, log prior, temperature, threshold) per strategy;
`cls.safetensors` is the classification expert in the expert file format.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from bayes_llm.dispatch.controller import Controller
from bayes_llm.errors import UserError
from bayes_llm.io import read_json, staged_dir, write_json
from bayes_llm.svf.expert import Expert, load_expert, save_expert

FORMAT = "bayes-llm/dispatcher"
FORMAT_VERSION = 1
CLS_FILE = "cls.safetensors"


class DispatcherError(UserError):
    pass


def save_dispatcher(directory: Path, controllers: Mapping[str, Controller], classifier: Expert, extra: dict) -> None:
    """Replace `directory` as a whole: a crash leaves the old dispatcher, never half of a new one."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_fingerprint": classifier.base_fingerprint,
        "svd_fingerprint": classifier.svd_fingerprint,
        "controllers": {name: c.to_json() for name, c in controllers.items()},
        **extra,
    }
    with staged_dir(directory) as staging:
        save_expert(classifier, staging / CLS_FILE)
        write_json(staging / "dispatcher.json", meta)


def load_dispatcher(directory: Path, svd_manifest: Mapping) -> tuple[dict[str, Controller], Expert, dict]:
    """(controllers per strategy, classification expert, metadata), checked against the decomposition."""
    path = Path(directory) / "dispatcher.json"
    meta = read_json(path, DispatcherError, "run `dvc repro calibrate`")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise DispatcherError(f"{path}: not a bayes-llm dispatcher (format {FORMAT} v{FORMAT_VERSION})")
    if meta["svd_fingerprint"] != svd_manifest["svd_fingerprint"]:
        raise DispatcherError(f"{path}: calibrated for another base or decomposition: run `dvc repro calibrate` again")
    try:
        controllers = {name: Controller.from_json(c) for name, c in meta["controllers"].items()}
    except (KeyError, TypeError, ValueError) as error:
        raise DispatcherError(f"{path}: unreadable controller ({error})") from None
    classifier = load_expert(Path(directory) / CLS_FILE, svd_manifest)
    return controllers, classifier, meta
