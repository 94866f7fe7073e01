"""Loading a real base checkpoint (local directory, hub id or GGUF file) instead of pretraining one.

Only families this project knows how to adapt are accepted, and never with remote code. A GGUF file
(llama.cpp's format, e.g. `bayes-llm fetch smollm2`) is dequantized to float32 once, by the base stage,
which saves it as a plain safetensors checkpoint in models/base.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from bayes_llm import paths
from bayes_llm.errors import UserError

# Hybrid Mamba/attention families, plus plain transformers as a baseline.
SUPPORTED_FAMILIES = ("bamba", "jamba", "granitemoehybrid", "falcon_h1", "zamba2", "llama", "qwen2", "qwen3")


class CheckpointError(UserError):
    pass


def _locate(source: str) -> str:
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CheckpointError(f"model.source {source!r}: GGUF file not found")
        return str(path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"model.source {source!r}: no config.json there (not a transformers checkpoint)")
        return str(path)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise CheckpointError(f"model.source {source!r}: directory not found")
    return source  # a hub id; needs network (or the local HF cache)


def load_checkpoint(source: str):
    """(model, tokenizer) in fp32 on the CPU, with a pad token and left padding."""
    location = _locate(source)
    # transformers reads a GGUF file as a directory plus a file name in it
    where = {"pretrained_model_name_or_path": str(Path(location).parent), "gguf_file": Path(location).name} \
        if location.endswith(".gguf") else {"pretrained_model_name_or_path": location}  # fmt: skip
    try:
        config = AutoConfig.from_pretrained(**where)
    except Exception as error:
        raise CheckpointError(f"model.source {source!r}: cannot read its config: {error}") from None
    if config.model_type not in SUPPORTED_FAMILIES:
        raise CheckpointError(
            f"model.source {source!r} is a {config.model_type!r} model; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(**where, padding_side="left")
    except Exception as error:  # truncated or corrupt weights, missing tokenizer files, no network
        raise CheckpointError(f"model.source {source!r}: cannot load it: {type(error).__name__}: {error}") from None
    if "gguf_file" in where:
        # Dequantized to float32 on load: a plain model now, which save_pretrained writes as safetensors
        # (it refuses while the GGUF quantizer is attached).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_base(base_dir: Path = paths.BASE) -> tuple:
    """The pipeline's base (model, tokenizer); a clear error, not a hub lookup, when it is missing."""
    if not (Path(base_dir) / "config.json").is_file():
        raise CheckpointError(f"{base_dir}: no base model there: run `dvc repro base` first")
    return load_checkpoint(str(base_dir))
