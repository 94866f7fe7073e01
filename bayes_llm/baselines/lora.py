"""The LoRA baseline (PEFT): one adapter per domain on the attention q/v projections (rank 16, as in
Transformer²'s comparison), trained with the experts' SFT objective (next-token loss on the worked
solution) on the same train split, then evaluated with oracle routing (each domain's own adapter).

Saved as `models/lora/<domain>/` (PEFT's adapter_config.json + adapter_model.safetensors) and
`models/lora/lora.json` (base fingerprint, settings); loading checks the fingerprint.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import set_seed

from bayes_llm import paths
from bayes_llm.errors import UserError
from bayes_llm.experts.objectives import sft_batch, sft_loss
from bayes_llm.io import read_json, staged_dir, write_json
from bayes_llm.model.load import load_base
from bayes_llm.svf.decompose import base_fingerprint

META = "lora.json"


class LoraError(UserError):
    """Adapters missing, or made for another base."""


def _fingerprint(model: torch.nn.Module, targets: Sequence[str]) -> str:
    """The base's fingerprint over the matrices the adapters attach to."""
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]  # fmt: skip
    if not names:
        raise LoraError(f"LoRA targets {list(targets)} match no linear layer of the base")
    return base_fingerprint(model, names)


def lora_config(rank: int, alpha: int, targets: Sequence[str]) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")  # fmt: skip


def train_adapters(
    base_dir: Path,
    train: Mapping[str, Sequence[dict]],
    *,
    rank: int,
    alpha: int,
    targets: Sequence[str],
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    out_dir: Path = paths.LORA,
    progress: bool = True,
) -> dict:
    """Train one adapter per domain of `train` and save them all; returns per-domain loss figures."""
    model, tokenizer = load_base(base_dir)
    fingerprint = _fingerprint(model, targets)
    config = lora_config(rank, alpha, targets)
    report: dict = {"domains": {}}
    peft_model = None
    for index, (domain, rows) in enumerate(train.items()):
        if not rows:
            raise LoraError(f"LoRA baseline: domain {domain} has no train rows")
        set_seed(seed + index)  # the adapter's random init
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=domain)
        else:
            peft_model.add_adapter(domain, config)
        peft_model.set_adapter(domain)  # only this adapter trains
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
        rng = random.Random(seed + index)
        peft_model.train()
        losses, started = [], time.perf_counter()
        for step in tqdm(range(steps), desc=f"LoRA {domain}", unit="step", disable=not progress):
            loss = sft_loss(peft_model, sft_batch(tokenizer, rng.sample(list(rows), min(batch_size, len(rows)))))
            if not math.isfinite(loss.item()):
                raise LoraError(f"LoRA {domain}: loss became {loss.item()} at step {step + 1}: lower the learning rate")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        peft_model.eval()
        report["domains"][domain] = {
            "first_loss": round(losses[0], 4),
            "last_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
            "trainable_parameters": sum(p.numel() for p in trainable),
            "train_seconds": round(time.perf_counter() - started, 1),
        }
    assert peft_model is not None, "train has at least one domain"
    settings = {"rank": rank, "alpha": alpha, "targets": list(targets), "steps": steps,
                "learning_rate": learning_rate, "batch_size": batch_size, "seed": seed, "objective": "sft"}  # fmt: skip
    with staged_dir(out_dir) as staging:
        peft_model.save_pretrained(staging)  # named adapters land in staging/<name>/
        _sort_target_modules(staging)
        meta = {"base_fingerprint": fingerprint, "domains": list(train), **settings}
        write_json(staging / META, meta)
    return {**report, **settings}


def _sort_target_modules(directory: Path) -> None:
    """PEFT writes `target_modules` from a set (order varies per process): sort it for stable bytes."""
    for config_path in directory.glob("*/adapter_config.json"):
        config = json.loads(config_path.read_text())
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
            write_json(config_path, config)


class LoraAdapters:
    """A second copy of the base with every domain's adapter; `weights(domain)` for BayesLLM's `lora` mode."""

    def __init__(self, base_dir: Path, lora_dir: Path = paths.LORA) -> None:
        meta = read_json(Path(lora_dir) / META, LoraError, "no LoRA adapters: run `dvc repro train_lora`")
        model, _ = load_base(base_dir)
        if meta["base_fingerprint"] != _fingerprint(model, meta["targets"]):
            raise LoraError(f"{lora_dir}: adapters were trained on another base: run `dvc repro train_lora`")
        self.domains: list[str] = meta["domains"]
        for index, domain in enumerate(self.domains):
            path = Path(lora_dir) / domain
            try:
                if index == 0:
                    model = PeftModel.from_pretrained(model, path, adapter_name=domain)
                else:
                    model.load_adapter(path, adapter_name=domain)
            except (SafetensorError, OSError, ValueError) as error:  # missing, truncated or overwritten files
                raise LoraError(
                    f"{path}: cannot load the adapter ({type(error).__name__}: {str(error)[:120]}); restore it with "
                    "`dvc checkout models/lora` or re-run `dvc repro train_lora`"
                ) from None
        self.model = model.eval()

    def weights(self, domain: str):
        """(key, load): the domain's adapter, or the plain base (adapters off) for a domain without one."""
        if domain not in self.domains:
            return (), self._load_base
        return ("lora", domain), lambda: self._load(domain)

    def _load(self, domain: str) -> None:
        self.model.base_model.enable_adapter_layers()
        self.model.set_adapter(domain)

    def _load_base(self) -> None:
        self.model.base_model.disable_adapter_layers()
