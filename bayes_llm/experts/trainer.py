"""The trainer of one expert's z: named steps (validate, sft step, rl step, checkpoint, resume) and
the phases that run them (SFT, then RL from the best SFT z).

Everything a step does is a function of (seed, step): batches are drawn with a generator seeded by
the step and sampling is seeded the same way, so a run resumed from a checkpoint (z, optimizer
state, best z, curve) ends bit-identical to one that was never interrupted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from bayes_llm.config import ExpertParams
from bayes_llm.errors import UserError
from bayes_llm.experts.distributed import Shards, kept_sequences, sft_part_loss, sft_share_loss
from bayes_llm.experts.objectives import completion_logprobs, reinforce_loss, rollouts, sft_batch, sft_loss
from bayes_llm.io import staged_dir
from bayes_llm.model.cloze import cloze_scores
from bayes_llm.model.greedy import greedy_scores
from bayes_llm.rewards.correctness import correctness
from bayes_llm.svf.scaling import SVF, identity_z

Z = dict[str, torch.Tensor]


class TrainingError(UserError):
    pass


@dataclass
class Best:
    """The z kept so far (best val accuracy) and, once RL follows SFT, the SFT z it must beat."""

    z: Z
    val: float
    base_val: float
    sft_z: Z | None = None
    sft_val: float | None = None


@dataclass
class TrainResult:
    best_z: Z
    best_val: float
    sft_z: Z | None
    sft_val: float | None
    base_val: float
    curve: list[dict]
    steps: int
    seconds: float
    resumed_from: int | None = None
    phases: list[tuple[str, int]] = field(default_factory=list)
    precision: str = "fp32"  # what trained: bf16 falls back to fp32 without native bf16


def native_bf16(device: str) -> bool:
    """Whether `device` computes bfloat16 matmuls in hardware. Elsewhere autocast to bf16 is emulated: on
    an AVX2-only CPU (AMD EPYC) a 256x512 @ 512x512 matmul took 104 ms under bf16 autocast against 1.1 ms
    in fp32, and a default reasoning step 21 s."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)  # pre-Ampere GPUs emulate it
    if device == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return True  # other backends: autocast decides


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

    def save(self, step: int, phase: str, svf: SVF, optimizer: torch.optim.Optimizer, best: Best, curve: list) -> None:
        tensors = {f"z.{n}": t for n, t in svf.z().items()}
        for key, z in (("best_z", best.z), ("sft_z", best.sft_z)):
            for n, t in (z or {}).items():
                tensors[f"{key}.{n}"] = t.clone()  # best and sft z may be the same tensors
        state = optimizer.state_dict()
        for index, slots in state["state"].items():
            for slot, value in slots.items():
                tensors[f"opt.{index}.{slot}"] = value.detach().clone().reshape(-1) if value.dim() == 0 else value
        meta = {
            "fingerprint": self.fingerprint,
            "step": step,
            "phase": phase,
            "best_val": best.val,
            "sft_val": best.sft_val,
            "base_val": best.base_val,
            "has_sft_z": bool(best.sft_z),
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


@functools.cache
def _training_code() -> str:
    """A hash of the code a step runs: a checkpoint written by other code (a fix between a failed run
    and its rerun) is not resumed into this run's z."""
    package = Path(__file__).resolve().parents[1]
    files = sorted(f for d in ("experts", "svf", "model", "rewards") for f in (package / d).rglob("*.py"))
    digest = hashlib.sha256()
    for file in [*files, package / "prompts.py", package / "config.py"]:
        digest.update(file.relative_to(package).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


class Trainer:
    """Trains z of `svf` for one domain; `run()` returns the best z and the curve."""

    def __init__(
        self,
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
        shards: Shards | None = None,
        cloze: bool = False,
    ) -> None:
        self.svf, self.model, self.tokenizer, self.kind = svf, svf.model, tokenizer, kind
        self.train_rows, self.val_rows = train_rows, list(val_rows)[: cfg.val_items]
        self.cfg, self.seed, self.eval_tokens, self.shards = cfg, seed, eval_tokens, shards or Shards()
        # Validated by choice-text likelihood (`cloze_scores`) instead of greedy exact match: a
        # `choice_answer: text` domain is scored that way on test, and a few hundred val items of written
        # choices are too coarse to tell close steps apart.
        self.cloze = cloze
        self.progress, self.log = progress and self.shards.main, log if self.shards.main else (lambda _: None)
        # bf16 only where the hardware has it: emulated, it is about 100x slower than fp32 (CPU autocast
        # would run it; CUDA autocast refuses it). The stage's report says when this fell back.
        self.precision = cfg.train_precision
        if self.precision == "bf16" and not native_bf16(next(svf.model.parameters()).device.type):
            self.precision = "fp32"
            self.log("train_precision bf16: this device has no native bfloat16 (AVX512-BF16, AMX or a bf16 GPU), "
                     "where autocast is about 100x slower; training in fp32")  # fmt: skip
        self.phases = phases_of(cfg)
        self.total = sum(steps for _, steps in self.phases)
        # A run with N processes resumes only its own kind of checkpoint (its z differs by rounding); with
        # fixed shares, any number of processes trains the same z, so resumes any of that kind.
        processes = f":{self.shards.world}" if self.shards.world > 1 else ""
        if self.shards.shares is not None:
            processes = f":shares={self.shards.shares}"
        # The rows too: a checkpoint of a run on other data (a re-prepared split) is not this run's.
        data = hashlib.sha256(json.dumps([list(train_rows), self.val_rows], sort_keys=True, default=str).encode())
        scoring = f"{svf.mode}:{svf.max_mult}:{eval_tokens}{':cloze' if cloze else ''}"
        fallback = f":{self.precision}" if self.precision != cfg.train_precision else ""  # a bf16 run's is not ours
        run = (f"{fingerprint}:{data.hexdigest()}:{cfg.model_dump_json()}{fallback}:{scoring}:{seed}{processes}"
               f":{_training_code()}")  # fmt: skip
        run_fingerprint = hashlib.sha256(run.encode()).hexdigest()
        self.checkpoint = _Checkpoint(checkpoint_dir, run_fingerprint)
        self.curve: list[dict] = []
        self.best: Best

    # -- named steps ---------------------------------------------------------------------------
    def validate(self) -> float:
        """Val accuracy: each part's rows scored on their own (with fixed shares, the same batches and
        padding for any number of processes), every process's scores gathered."""
        scores = []
        for part in self.shards.parts():
            rows = part.share(self.val_rows)
            if self.cloze:
                scores += cloze_scores(self.model, self.tokenizer, rows, self.cfg.eval_batch_size)
            else:
                scores += greedy_scores(self.model, self.tokenizer, self.kind, rows, self.eval_tokens,
                                        self.cfg.eval_batch_size)  # fmt: skip
        scores = self.shards.gather(scores)
        return sum(scores) / max(len(scores), 1)

    def sft_parts(self, step: int) -> Iterator[tuple[torch.Tensor, dict]]:
        """The loss and record of each of this process's parts of the step's batch (`Shards.parts`), one
        at a time (`Shards.backward` back-propagates each before the next is computed)."""
        generator = self._train_mode(step)
        picks = torch.randint(len(self.train_rows), (self.cfg.sft_batch_size,), generator=generator).tolist()
        batch = sft_batch(self.tokenizer, [self.train_rows[i] for i in picks])
        parts, drop = self.shards.parts(), self.cfg.sft_drop_hardest
        if parts[0].world == 1:
            with self._autocast():
                loss = sft_loss(self.model, batch, drop)
            yield loss, {"loss": float(loss.detach())}
            return
        if self.shards.shares is None:  # the global batch (one process's padding), this process's rows of it
            with self._autocast():
                loss = sft_share_loss(self.model, batch, drop, self.shards)
            yield loss, {"loss": float(loss.detach())}
            return
        keep = None
        if drop > 0:
            with self._autocast():
                keep = kept_sequences(self.model, batch, drop, parts, self.shards)
        for part in parts:
            with self._autocast():
                loss = sft_part_loss(self.model, batch, part, keep)
            yield loss, {"loss": float(loss.detach())}

    def rl_parts(self, step: int) -> Iterator[tuple[torch.Tensor, dict]]:
        """Transformer²'s REINFORCE: ±1 reward (minus the group mean with `baseline`), KL to z = 1 with
        `beta`; the loss and record of each of this process's parts of the step's batch, one at a time."""
        generator = self._train_mode(step)
        picks = torch.randint(len(self.train_rows), (self.cfg.rl_batch_size,), generator=generator).tolist()
        rows = [self.train_rows[i] for i in picks]
        for part in self.shards.parts():
            yield self._rl_part(step, rows, part)

    def _rl_part(self, step: int, picked: list[dict], part: Shards) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        rows = part.share(picked)  # whole groups: baselines stay within a part
        # Sampling seeded per step and part (greedy rollouts are the same in any split).
        torch.manual_seed((self.seed * 1_000_003 + step) * part.world + part.rank)
        self.model.eval()  # rollouts as the policy acts at test time (no dropout either way)
        batch = rollouts(self.model, self.tokenizer, rows, cfg.num_generations, cfg.temperature, cfg.max_new_tokens)
        group_rows = [row for row in rows for _ in range(cfg.num_generations)]
        reward = torch.tensor(correctness(self.kind, batch.texts, group_rows))
        advantages = 2 * reward - 1  # Transformer²: +1 right, −1 wrong
        if cfg.baseline:
            groups = advantages.view(len(rows), cfg.num_generations)
            advantages = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
        ref = self._base_logprobs(batch) if cfg.beta > 0 else None
        self.model.train()
        with self._autocast():
            logprobs = completion_logprobs(self.model, batch)
        loss, kl = reinforce_loss(logprobs, batch.completion_mask, advantages, ref, cfg.beta)
        if part.world > 1:  # this part's share of the global batch's mean
            share = len(rows) / cfg.rl_batch_size
            loss, kl, reward = loss * share, kl * share, reward * share
        return loss, {"loss": float(loss.detach()), "reward": float(reward.mean()), "kl": kl}

    def save_checkpoint(self, step: int, phase: str) -> None:
        self.checkpoint.save(step, phase, self.svf, self.optimizer, self.best, self.curve)

    def resume(self) -> tuple[dict, Z] | None:
        """Restore z, the best z and the curve from a checkpoint of this same run; None when there is none."""
        restored = self.checkpoint.load()
        if restored is None:
            return None
        meta, tensors = restored
        self.curve = meta["curve"]
        self.svf.load_z(_prefixed(tensors, "z."))
        self.best = Best(z=_prefixed(tensors, "best_z."), val=meta["best_val"], base_val=meta["base_val"],
                         sft_z=_prefixed(tensors, "sft_z.") if meta["has_sft_z"] else None,
                         sft_val=meta["sft_val"])  # fmt: skip
        self.log(f"resuming from the checkpoint at step {meta['step']}/{self.total}")
        return restored

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        started = time.perf_counter()
        restored = self.resume()
        start = restored[0]["step"] if restored else 0
        if len(set(self.shards.gather([start]))) > 1:  # each process reads the checkpoint itself
            raise TrainingError(f"the processes restored different steps from {self.checkpoint.directory}: "
                                "remove it and rerun")  # fmt: skip
        if not restored:
            base_val = self.validate()
            self.best = Best(z=self.svf.z(), val=base_val, base_val=base_val)
            self.curve = [{"step": 0, "phase": self.phases[0][0], "val_accuracy": base_val}]
        phase = _locate(self.phases, start)[0] if start < self.total else self.phases[-1][0]
        self.optimizer = self._optimizer(phase)
        if restored and restored[0]["phase"] == phase and start < self.total:
            self.optimizer.load_state_dict(_optimizer_state(*restored))
        self.bar = tqdm(range(start, self.total), desc=f"train {'+'.join(p for p, _ in self.phases)}", unit="step",
                        disable=not self.progress)  # fmt: skip
        for step in self.bar:
            phase, within, length = _locate(self.phases, step)
            if within == 0 and phase == "rl" and self.best.sft_z is None and "sft" in self.cfg.objective:
                self._start_rl_from_sft()
            if phase == "rl" and self.cfg.rl_algorithm != "reinforce":
                self._trl_phase(step, length - within)
                break
            parts = self.sft_parts(step) if phase == "sft" else self.rl_parts(step)
            record = self.shards.backward(parts, self.svf.parameters())
            if math.isfinite(record["loss"]):  # a non-finite loss must not reach z: _finish() stops the run
                grads = [p.grad.norm() for p in self.svf.parameters() if p.grad is not None]
                record["grad_norm"] = round(float(torch.stack(grads).norm()), 6) if grads else 0.0
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self._finish(step, record)
        if self.best.sft_z is None and self.cfg.objective == "sft":
            self.best.sft_z, self.best.sft_val = self.best.z, self.best.val
        if self.shards.main and start < self.total:
            # Kept until the caller has written its outputs (`finished`): a run killed while scoring
            # the result resumes here, with nothing left to train.
            self.save_checkpoint(self.total, self.phases[-1][0])
        return TrainResult(best_z=self.best.z, best_val=self.best.val, sft_z=self.best.sft_z,
                           sft_val=self.best.sft_val, base_val=self.best.base_val, curve=self.curve, steps=self.total,
                           seconds=time.perf_counter() - started, resumed_from=start if restored else None,
                           phases=self.phases, precision=self.precision)  # fmt: skip

    def finished(self) -> None:
        """The caller has written what it made of the result: the checkpoint goes."""
        if self.shards.main:
            self.checkpoint.clear()

    def _finish(self, step: int, record: dict) -> None:
        """After a step's update: stop on non-finite values, validate, keep the best z, checkpoint."""
        phase, within, length = _locate(self.phases, step)
        if not math.isfinite(record["loss"]):
            raise TrainingError(
                f"non-finite loss at step {step + 1} ({phase}): lower the learning rate (the run then starts "
                f"over; the checkpoint of the last good step, in {self.checkpoint.directory}, resumes only "
                "these settings)"
            )
        if not all(bool(torch.isfinite(p).all()) for p in self.svf.parameters()):
            raise TrainingError(f"z became non-finite at step {step + 1} ({phase}): lower the learning rate")
        record = {"step": step + 1, "phase": phase, **record}
        if (within + 1) % self.cfg.eval_every == 0 or within + 1 == length:
            record["val_accuracy"] = self.validate()
            if record["val_accuracy"] > self.best.val:
                self.best.val, self.best.z = record["val_accuracy"], self.svf.z()
            self.bar.set_postfix(val=f"{record['val_accuracy']:.3f}", best=f"{self.best.val:.3f}")
        self.curve.append(record)
        if (step + 1) % self.cfg.checkpoint_every == 0 and step + 1 < self.total and self.shards.main:
            self.save_checkpoint(step + 1, phase)

    def _start_rl_from_sft(self) -> None:
        """RL starts from the best SFT z, and must beat it on val to replace it."""
        self.best.sft_z, self.best.sft_val = self.best.z, self.best.val
        self.svf.load_z(self.best.sft_z)
        self.optimizer = self._optimizer("rl")

    def _trl_phase(self, step: int, steps: int) -> None:
        """trl runs the rest of the RL phase (the last phase) in one go, reporting each step."""
        from bayes_llm.experts.trl_rl import trl_phase  # imported here: transformers' Trainer and peft take 2.5 s

        def on_step(step: int, record: dict) -> None:
            self._finish(step, record)
            self.bar.update()

        trl_phase(self.model, self.tokenizer, self.kind, self.train_rows, self.cfg, self.seed, step, steps,
                  self.optimizer, on_step, bf16=self.precision == "bf16")  # fmt: skip

    def _train_mode(self, step: int) -> torch.Generator:
        self.model.train()
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step)

    def _base_logprobs(self, batch) -> torch.Tensor:
        """The rollouts' log-probs under the base (z = 1): the KL reference."""
        current = self.svf.z()
        self.svf.load_z({n: identity_z(z.numel(), self.svf.mode, self.svf.max_mult) for n, z in current.items()})
        with torch.no_grad(), self._autocast():
            ref = completion_logprobs(self.model, batch)
        self.svf.load_z(current)
        return ref

    def _autocast(self) -> torch.autocast:
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _optimizer(self, phase: str) -> torch.optim.Optimizer:
        lr = self.cfg.sft_learning_rate if phase == "sft" else self.cfg.rl_learning_rate
        return torch.optim.AdamW(self.svf.parameters(), lr=lr, weight_decay=0.0)
