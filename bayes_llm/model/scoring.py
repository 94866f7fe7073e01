"""Log-likelihood of token spans under a causal model: the shared core of cloze scoring (a choice's
text after its question) and first-pass label scoring (a label after the classification prompt)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def right_padded(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask; right padding, so a causal model's scores at real positions never
    see the padding after them."""
    width = max(len(s) for s in sequences)
    input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    return input_ids, attention_mask


@torch.no_grad()
def span_logprobs(model, sequences: list[list[int]], spans: Sequence[tuple[int, int]], pad: int) -> torch.Tensor:
    """[len(sequences)] float64: for each sequence, the summed log-probability of its tokens
    `begin : begin + length` given everything before them (one forward pass, right padded)."""
    if any(begin < 1 for begin, _ in spans):
        raise ValueError("a scored span needs at least one token before it")
    input_ids, attention_mask = right_padded(sequences, pad)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logprobs = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    sums = [row[begin - 1 : begin - 1 + length].sum() for row, (begin, length) in zip(logprobs, spans, strict=True)]
    return torch.stack(sums).double()
