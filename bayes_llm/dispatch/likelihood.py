"""First-pass likelihoods: how likely the model finds each label after the classification prompt.

When the labels' first tokens are all different (the default domains and `other`), that token alone
identifies the label, so one forward pass over the prompt scores every label: log p(first token |
`Task: <prompt> / Domain:`). Otherwise each label is scored as the sum of the log-probabilities of
its tokens and the EOS that ends a classification document in pretraining (one forward pass over
prompt × label sequences), so labels of different token lengths and shared prefixes compare fairly.
No free generation either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bayes_llm.model.scoring import right_padded, span_logprobs
from bayes_llm.prompts import classify_question, model_context, reply_separator


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
    separator = reply_separator(tokenizer)
    label_ids = [[*_encode(tokenizer, separator + label), tokenizer.eos_token_id] for label in labels]
    firsts = [ids[0] for ids in label_ids]
    first_token_only = len(set(firsts)) == len(firsts)
    out = torch.empty(len(prompts), len(labels), dtype=torch.float64)
    per_batch = batch_size if first_token_only else max(1, batch_size // len(labels))
    starts = range(0, len(prompts), per_batch)
    for start in tqdm(starts, desc="pass 1", unit="batch", disable=not progress):
        chunk = prompts[start : start + per_batch]
        contexts = [_encode(tokenizer, model_context(tokenizer, classify_question(tokenizer, prompt, labels)))
                    for prompt in chunk]
        if first_token_only:
            input_ids, attention_mask = right_padded(contexts, tokenizer.pad_token_id)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            last = logits[torch.arange(len(chunk)), torch.tensor([len(c) - 1 for c in contexts])].float()
            out[start : start + len(chunk)] = F.log_softmax(last, dim=-1)[:, firsts].double()
            continue
        sequences, spans = [], []
        for context in contexts:
            for ids in label_ids:
                sequences.append(context + ids)
                spans.append((len(context), len(ids)))
        scores = span_logprobs(model, sequences, spans, tokenizer.pad_token_id)
        out[start : start + len(chunk)] = scores.view(len(chunk), len(labels))
    return out
