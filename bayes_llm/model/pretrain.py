"""Pretraining a `scratch` MambaFormer on the mixture of every domain's train split.

Each train row becomes a document `Question: <prompt> / Answer: <answer>` (or, with probability
`solution_share` where the row has one, its worked solution); with probability `classify_share` the
same prompt also appears as `Task: <prompt> / Domain: <label>`, which is what the first dispatch
pass asks later. Documents are wrapped in BOS/EOS, packed into fixed-length blocks and trained with
the HF Trainer on the CPU.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Trainer, TrainerCallback, TrainingArguments, default_data_collator

from bayes_llm.config import PretrainParams
from bayes_llm.io import write_csv
from bayes_llm.prompts import answer_document, classify_document


def documents(
    rows_by_domain: dict[str, list[dict]],
    classify_share: float,
    seed: int,
    weights: dict[str, float] | None = None,
    solution_share: float = 0.0,
) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for domain, rows in rows_by_domain.items():
        weight = (weights or {}).get(domain, 1.0)
        for row in rows:
            copies = int(weight) + (rng.random() < weight - int(weight))
            worked = row.get("solution") and rng.random() < solution_share
            docs.extend([answer_document(row["prompt"], row["solution"] if worked else row["answer"])] * copies)
            if rng.random() < classify_share:
                docs.append(classify_document(row["prompt"], domain))
    rng.shuffle(docs)
    return docs


def pack(docs: list[str], tokenizer: PreTrainedTokenizerFast, seq_len: int) -> torch.Tensor:
    """BOS doc EOS BOS doc EOS ... cut into [n, seq_len] blocks (the remainder is dropped)."""
    ids = tokenizer([tokenizer.bos_token + d + tokenizer.eos_token for d in docs], add_special_tokens=False)
    stream = [token for doc in ids["input_ids"] for token in doc]
    blocks = len(stream) // seq_len
    if blocks == 0:
        raise ValueError(f"only {len(stream)} tokens of text: fewer than one block of pretrain.seq_len={seq_len}")
    return torch.tensor(stream[: blocks * seq_len]).view(blocks, seq_len)


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class _Curve(TrainerCallback):
    """Collects train/val loss per step for `dvc plots`."""

    def __init__(self) -> None:
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.train.append((state.global_step, float(logs["loss"])))
        if "eval_loss" in logs:
            self.val.append((state.global_step, float(logs["eval_loss"])))


def write_curve(points: list[tuple[int, float]], path: Path) -> None:
    write_csv(path, ["step", "loss"], [(step, round(loss, 6)) for step, loss in points])


def pretrain(
    model,
    train_blocks: torch.Tensor,
    val_blocks: torch.Tensor,
    params: PretrainParams,
    seed: int,
    progress: bool = True,
) -> dict:
    curve = _Curve()
    with tempfile.TemporaryDirectory(prefix="bayes-llm-pretrain-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            use_cpu=True,
            per_device_train_batch_size=params.batch_size,
            per_device_eval_batch_size=params.batch_size,
            max_steps=params.max_steps,
            learning_rate=params.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=params.warmup_steps,
            weight_decay=params.weight_decay,
            logging_steps=max(1, min(params.eval_every, 10)),
            eval_strategy="steps",
            eval_steps=params.eval_every,
            save_strategy="no",
            report_to="none",
            seed=seed,
            data_seed=seed,
            dataloader_num_workers=0,
            disable_tqdm=not progress,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=_Blocks(train_blocks),
            eval_dataset=_Blocks(val_blocks),
            data_collator=default_data_collator,
            callbacks=[curve],
        )
        started = time.monotonic()
        trainer.train()
        seconds = time.monotonic() - started
        final_val = trainer.evaluate()["eval_loss"]
    if not curve.val or curve.val[-1][0] != params.max_steps:
        curve.val.append((params.max_steps, float(final_val)))
    tokens = params.max_steps * params.batch_size * train_blocks.shape[1]
    return {
        "train_seconds": round(seconds, 1),
        "train_tokens": tokens,
        "train_tokens_per_second": round(tokens / seconds, 1),
        "final_train_loss": round(curve.train[-1][1], 4) if curve.train else None,
        "final_val_loss": round(float(final_val), 4),
        "curve": curve,
    }
