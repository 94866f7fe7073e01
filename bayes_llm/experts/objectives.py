"""Losses on z: next-token SFT on reference answers, and REINFORCE on sampled or greedy rollouts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bayes_llm.prompts import answer_prompt, model_context, reply_separator


def _prompt_ids(tokenizer, prompt: str, template: Callable[[str], str] = answer_prompt) -> list[int]:
    return tokenizer(model_context(tokenizer, template(prompt)), add_special_tokens=False)["input_ids"]


def _left_pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([[value] * (width - len(s)) + s for s in sequences])


def sft_target(row: dict) -> str:
    """The reference an expert imitates: the worked solution where the row has one, else the answer."""
    return str(row.get("solution") or row["answer"]).strip()


def sft_batch(
    tokenizer, rows: Sequence[dict], template: Callable[[str], str] = answer_prompt
) -> dict[str, torch.Tensor]:
    """The model's context for template(prompt), then the target and EOS, left-padded; the loss sees the
    target tokens only."""
    ids, labels = [], []
    separator = reply_separator(tokenizer)
    for row in rows:
        prompt = _prompt_ids(tokenizer, row["prompt"], template)
        answer = tokenizer(separator + sft_target(row), add_special_tokens=False)["input_ids"]
        answer = [*answer, tokenizer.eos_token_id]
        ids.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    input_ids = _left_pad(ids, tokenizer.pad_token_id)
    return {
        "input_ids": input_ids,
        "attention_mask": _left_pad([[1] * len(s) for s in ids], 0),
        "labels": _left_pad(labels, -100),
    }


def sft_loss(model, batch: dict[str, torch.Tensor], drop_hardest: float = 0.0) -> torch.Tensor:
    """Mean next-token loss over the target tokens.

    drop_hardest > 0 is loss truncation (Kang & Hashimoto, 2020): that share of the batch's sequences,
    those with the highest mean token loss, is left out of the update, so targets z cannot reach
    (a skill the base lacks) do not drown out the ones it can.
    """
    if drop_hardest == 0:
        return model(**batch).loss
    nll, mask = token_nll(model, batch)
    per_sequence = nll.detach().sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    keep = per_sequence.argsort()[: max(1, round(len(per_sequence) * (1 - drop_hardest)))]
    return nll[keep].sum() / mask[keep].sum().clamp_min(1.0)


def token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token loss of each target token, zero elsewhere; the target mask), B × (T − 1)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    mask = (targets != -100).float()
    return F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none") * mask, mask


@dataclass
class Rollouts:
    input_ids: torch.Tensor  # prompt + completion
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor  # completion tokens up to and including EOS
    prompt_width: int
    texts: list[str]


@torch.no_grad()
def rollouts(model, tokenizer, rows: Sequence[dict], n: int, temperature: float, max_new_tokens: int) -> Rollouts:
    """n completions per row (greedy when temperature is 0), in row-major order."""
    prompts = [_prompt_ids(tokenizer, row["prompt"]) for row in rows]
    input_ids = _left_pad(prompts, tokenizer.pad_token_id)
    attention_mask = _left_pad([[1] * len(p) for p in prompts], 0)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False}
    generated = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        num_return_sequences=n,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sampling,
    )
    width = input_ids.shape[1]
    completion = generated[:, width:]
    is_eos = completion == tokenizer.eos_token_id
    # Keep tokens up to the first EOS (inclusive); what generate pads after it is not the policy's.
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    completion_mask = (~after_eos).long()
    kept = [c[m.bool()] for c, m in zip(completion, completion_mask, strict=True)]
    texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in kept]
    return Rollouts(
        input_ids=generated,
        attention_mask=torch.cat([attention_mask.repeat_interleave(n, dim=0), completion_mask], dim=1),
        completion_mask=completion_mask,
        prompt_width=width,
        texts=texts,
    )


def completion_logprobs(model, batch: Rollouts) -> torch.Tensor:
    """Log-probability of each completion token under `model` (B × completion length)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits = logits[:, batch.prompt_width - 1 : -1].float()
    targets = batch.input_ids[:, batch.prompt_width :]
    return torch.gather(F.log_softmax(logits, dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)


def reinforce_loss(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, float]:
    """−A · mean log p(completion) (+ β · KL to the reference, k3 estimator); returns (loss, kl)."""
    mask = mask.float()
    lengths = mask.sum(dim=1).clamp_min(1.0)
    sequence = (logprobs * mask).sum(dim=1) / lengths
    loss = -(advantages * sequence).mean()
    kl_value = 0.0
    if ref_logprobs is not None and beta > 0:
        delta = ref_logprobs - logprobs
        kl = ((torch.exp(delta) - delta - 1) * mask).sum(dim=1) / lengths
        loss = loss + beta * kl.mean()
        kl_value = float(kl.mean().detach())
    return loss, kl_value
