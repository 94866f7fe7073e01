"""Greedy generation and exact match on a domain's rows: the quick quality check of a model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from bayes_llm.prompts import answer_prompt, model_context
from bayes_llm.rewards.correctness import correctness


@torch.no_grad()
def greedy_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    progress: bool = False,
    desc: str = "generating",
) -> list[str]:
    """Completions in input order; batches are formed by length (less padding, same results)."""
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        index = order[start : start + batch_size]
        texts = [model_context(tokenizer, prompts[i]) for i in index]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = generated[:, batch["input_ids"].shape[1] :]
        for i, tokens in zip(index, new, strict=True):
            out[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    return out


def domain_accuracy(
    model,
    tokenizer,
    rows: Sequence[dict],
    kind: str,
    max_new_tokens: int,
    batch_size: int,
    progress: bool = False,
    desc: str = "generating",
) -> dict:
    prompts = [answer_prompt(row["prompt"]) for row in rows]
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens, batch_size, progress, desc)
    hits = correctness(kind, completions, rows)  # code: its tests pass in the sandbox, not merely "it parses"
    return {
        "accuracy": sum(hits) / max(len(hits), 1),
        "items": len(hits),
        "examples": [
            {"prompt": r["prompt"], "answer": r["answer"], "completion": c}
            for r, c in zip(rows[:3], completions[:3], strict=True)
        ],
    }


def greedy_scores(
    model, tokenizer, kind: str, rows: Sequence[dict], max_new_tokens: int, batch_size: int
) -> list[float]:
    """Correctness (1/0) of the greedy answer to each row; code runs its tests in the sandbox."""
    prompts = [answer_prompt(row["prompt"]) for row in rows]
    return correctness(kind, greedy_completions(model, tokenizer, prompts, max_new_tokens, batch_size), rows)
