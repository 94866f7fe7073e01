"""The training loop of one expert's z: phases (SFT, RL), validation, best z, checkpoints, resume.

Everything a step does is a function of (seed, step): batches are drawn with a generator seeded by
the step and sampling is seeded the same way, so a run resumed from a checkpoint (z, optimizer
state, best z, curve) ends bit-identical to one that was never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from bayes_llm.config import ExpertParams
from bayes_llm.errors import UserError
from bayes_llm.eval.greedy import greedy_scores
from bayes_llm.experts.objectives import completion_logprobs, reinforce_loss, rollouts, sft_batch, sft_loss
from bayes_llm.experts.trl_rl import trl_phase
from bayes_llm.io import staged_dir
from bayes_llm.rewards.correctness import correctness
from bayes_llm.svf.scaling import SVF, identity_z


class TrainingError(UserError):
    pass


@dataclass
class TrainResult:
    best_z: dict[str, torch.Tensor]
    best_val: float
    sft_z: dict[str, torch.Tensor] | None
    sft_val: float | None
    base_val: float
    curve: list[dict]
    steps: int
    seconds: float
    resumed_from: int | None = None
    phases: list[tuple[str, int]] = field(default_factory=list)


def phases_of(cfg: ExpertParams) -> list[tuple[str, int]]:
    return [(name, steps) for name, steps in (("sft", cfg.sft_steps), ("rl", cfg.rl_steps)) if name in cfg.objective]


def _locate(phases: list[tuple[str, int]], step: int) -> tuple[str, int, int]:
    """(phase, step within it, the phase's length) of a global step."""
    for name, steps in phases:
        if step < steps:
            return name, step, steps
        step -= steps
    raise IndexError(step)


class _Checkpoint:
    """z, optimizer state, best z and curve under one directory, replaced atomically."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory, self.fingerprint = Path(directory), fingerprint

    def save(self, step: int, phase: str, svf: SVF, optimizer: torch.optim.Optimizer, best: dict, curve: list) -> None:
        tensors = {f"z.{n}": t for n, t in svf.z().items()}
        for key in ("best_z", "sft_z"):
            for n, t in (best.get(key) or {}).items():
                tensors[f"{key}.{n}"] = t.clone()  # best and sft z may be the same tensors
        state = optimizer.state_dict()
        for index, slots in state["state"].items():
            for slot, value in slots.items():
                tensors[f"opt.{index}.{slot}"] = value.detach().clone().reshape(-1) if value.dim() == 0 else value
        meta = {
            "fingerprint": self.fingerprint,
            "step": step,
            "phase": phase,
            "best_val": best["best_val"],
            "sft_val": best.get("sft_val"),
            "base_val": best["base_val"],
            "has_sft_z": bool(best.get("sft_z")),
            "param_groups": state["param_groups"],
            "opt_slots": {str(i): sorted(s) for i, s in state["state"].items()},
            "curve": curve,
        }
        with staged_dir(self.directory) as staging:
            save_file({k: v.contiguous() for k, v in tensors.items()}, staging / "state.safetensors")
            (staging / "state.json").write_text(json.dumps(meta))

    def load(self) -> tuple[dict, dict[str, torch.Tensor]] | None:
        meta_path = self.directory / "state.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(self.directory / "state.safetensors")
        except Exception:  # an unreadable checkpoint is no checkpoint: start over
            return None
        if meta.get("fingerprint") != self.fingerprint:
            return None
        return meta, tensors

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _optimizer_state(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state = {}
    for index, slots in meta["opt_slots"].items():
        state[int(index)] = {
            slot: (tensors[f"opt.{index}.{slot}"].reshape(()) if slot == "step" else tensors[f"opt.{index}.{slot}"])
            for slot in slots
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def train_expert(
    svf: SVF,
    tokenizer,
    kind: str,
    train_rows: Sequence[dict],
    val_rows: Sequence[dict],
    cfg: ExpertParams,
    seed: int,
    checkpoint_dir: Path,
    fingerprint: str,
    eval_tokens: int,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    model = svf.model
    phases = phases_of(cfg)
    total = sum(steps for _, steps in phases)
    val_rows = list(val_rows)[: cfg.val_items]
    fingerprint = hashlib.sha256(f"{fingerprint}:{cfg.model_dump_json()}:{seed}".encode()).hexdigest()
    checkpoint = _Checkpoint(checkpoint_dir, fingerprint)

    def validate() -> float:
        scores = greedy_scores(model, tokenizer, kind, val_rows, eval_tokens, cfg.eval_batch_size)
        return sum(scores) / max(len(scores), 1)

    def autocast() -> torch.autocast:
        device = next(model.parameters()).device.type
        return torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.train_precision == "bf16")

    def make_optimizer(phase: str) -> torch.optim.Optimizer:
        lr = cfg.sft_learning_rate if phase == "sft" else cfg.rl_learning_rate
        return torch.optim.AdamW(svf.parameters(), lr=lr, weight_decay=0.0)

    started = time.perf_counter()
    restored = checkpoint.load()
    if restored:
        meta, tensors = restored
        start, curve = meta["step"], meta["curve"]
        svf.load_z(_prefixed(tensors, "z."))
        best = {
            "best_val": meta["best_val"],
            "best_z": _prefixed(tensors, "best_z."),
            "base_val": meta["base_val"],
            "sft_val": meta["sft_val"],
            "sft_z": _prefixed(tensors, "sft_z.") if meta["has_sft_z"] else None,
        }
        log(f"resuming from the checkpoint at step {start}/{total}")
    else:
        start, curve = 0, []
        base_val = validate()
        best = {"best_val": base_val, "best_z": svf.z(), "base_val": base_val, "sft_val": None, "sft_z": None}
        curve.append({"step": 0, "phase": phases[0][0], "val_accuracy": base_val})
    phase = _locate(phases, start)[0] if start < total else phases[-1][0]
    optimizer = make_optimizer(phase)
    if restored and restored[0]["phase"] == phase and start < total:
        optimizer.load_state_dict(_optimizer_state(*restored))

    bar = tqdm(range(start, total), desc=f"train {'+'.join(p for p, _ in phases)}", unit="step", disable=not progress)

    def finish(step: int, record: dict) -> None:
        """After a step's update: stop on non-finite values, validate, keep the best z, checkpoint."""
        phase, within, length = _locate(phases, step)
        if not math.isfinite(record["loss"]):
            raise TrainingError(
                f"non-finite loss at step {step + 1} ({phase}): lower the learning rate; the last good "
                f"checkpoint is kept in {checkpoint_dir}"
            )
        if not all(bool(torch.isfinite(p).all()) for p in svf.parameters()):
            raise TrainingError(f"z became non-finite at step {step + 1} ({phase}): lower the learning rate")
        record = {"step": step + 1, "phase": phase, **record}
        if (within + 1) % cfg.eval_every == 0 or within + 1 == length:
            record["val_accuracy"] = validate()
            if record["val_accuracy"] > best["best_val"]:
                best["best_val"], best["best_z"] = record["val_accuracy"], svf.z()
            bar.set_postfix(val=f"{record['val_accuracy']:.3f}", best=f"{best['best_val']:.3f}")
        curve.append(record)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            checkpoint.save(step + 1, phase, svf, optimizer, best, curve)

    for step in bar:
        phase, within, length = _locate(phases, step)
        if within == 0 and phase == "rl" and best["sft_z"] is None and "sft" in cfg.objective:
            # RL starts from the best SFT z, and must beat it on val to replace it.
            best["sft_z"], best["sft_val"] = best["best_z"], best["best_val"]
            svf.load_z(best["sft_z"])
            optimizer = make_optimizer("rl")
        if phase == "rl" and cfg.rl_algorithm != "reinforce":

            def on_step(step: int, record: dict) -> None:
                finish(step, record)
                bar.update()

            # trl runs the rest of the RL phase (the last phase) in one go, reporting each step.
            trl_phase(model, tokenizer, kind, train_rows, cfg, seed, step, length - within, optimizer, on_step)
            break
        model.train()
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        if phase == "sft":
            picks = torch.randint(len(train_rows), (cfg.sft_batch_size,), generator=generator).tolist()
            with autocast():
                loss = sft_loss(model, sft_batch(tokenizer, [train_rows[i] for i in picks]), cfg.sft_drop_hardest)
            record = {"loss": float(loss.detach())}
        else:
            picks = torch.randint(len(train_rows), (cfg.rl_batch_size,), generator=generator).tolist()
            rows = [train_rows[i] for i in picks]
            torch.manual_seed(seed * 1_000_003 + step)
            model.eval()  # rollouts as the policy acts at test time (no dropout either way)
            batch = rollouts(model, tokenizer, rows, cfg.num_generations, cfg.temperature, cfg.max_new_tokens)
            group_rows = [row for row in rows for _ in range(cfg.num_generations)]
            reward = torch.tensor(correctness(kind, batch.texts, group_rows))
            signed = 2 * reward - 1  # Transformer²: +1 right, −1 wrong
            advantages = signed
            if cfg.baseline:
                groups = signed.view(len(rows), cfg.num_generations)
                advantages = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
            ref = None
            if cfg.beta > 0:
                current = svf.z()
                svf.load_z({n: identity_z(z.numel(), svf.mode, svf.max_mult) for n, z in current.items()})
                with torch.no_grad(), autocast():
                    ref = completion_logprobs(model, batch)
                svf.load_z(current)
            model.train()
            with autocast():
                logprobs = completion_logprobs(model, batch)
            loss, kl = reinforce_loss(logprobs, batch.completion_mask, advantages, ref, cfg.beta)
            record = {"loss": float(loss.detach()), "reward": float(reward.mean()), "kl": kl}
        if math.isfinite(record["loss"]):  # a non-finite loss must not reach z: finish() stops the run
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finish(step, record)
    if best["sft_z"] is None and cfg.objective == "sft":
        best["sft_z"], best["sft_val"] = best["best_z"], best["best_val"]
    checkpoint.clear()
    return TrainResult(
        best_z=best["best_z"],
        best_val=best["best_val"],
        sft_z=best["sft_z"],
        sft_val=best["sft_val"],
        base_val=best["base_val"],
        curve=curve,
        steps=total,
        seconds=time.perf_counter() - started,
        resumed_from=start if restored else None,
        phases=phases,
    )
