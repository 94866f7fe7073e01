"""First-pass likelihoods: how likely the model finds each label after the classification prompt.

Each label is scored as the sum of the log-probabilities of its tokens (and the EOS that ends a
classification document in pretraining) after `Task: <prompt> / Domain:`, so labels of different
token lengths and shared prefixes are compared fairly. No free generation: one forward pass over
prompt × label sequences.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bayes_llm.prompts import classify_prompt


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def label_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    labels: Sequence[str],
    batch_size: int = 32,
    progress: bool = False,
) -> torch.Tensor:
    """[len(prompts), len(labels)] log p(label | classification prompt), float64."""
    model.eval()
    label_ids = [[*_encode(tokenizer, " " + label), tokenizer.eos_token_id] for label in labels]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = torch.empty(len(prompts), len(labels), dtype=torch.float64)
    per_batch = max(1, batch_size // len(labels))
    starts = range(0, len(prompts), per_batch)
    for start in tqdm(starts, desc="pass 1", unit="batch", disable=not progress):
        chunk = prompts[start : start + per_batch]
        sequences, spans = [], []
        for prompt in chunk:
            context = bos + _encode(tokenizer, classify_prompt(prompt))
            for ids in label_ids:
                sequences.append(context + ids)
                spans.append((len(context), len(ids)))
        # Right padding: a causal model's scores at real positions never see the padding after them.
        width = max(len(s) for s in sequences)
        input_ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in sequences])
        attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        logprobs = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        scores = [logprobs[i, start_ - 1 : start_ - 1 + n].sum() for i, (start_, n) in enumerate(spans)]
        out[start : start + len(chunk)] = torch.stack(scores).double().view(len(chunk), len(labels))
    return out
