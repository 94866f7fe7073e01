"""Multiple choice scored by each choice's text (cloze): the quality check of a `choice_answer: text`
domain, scored as lm-eval scores its test task (`_choice_text.yaml`, acc_norm): log p(choice text |
the answer context) divided by the text's length in characters; the top choice is the model's answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from bayes_llm.data.rows import LETTERS
from bayes_llm.model.scoring import span_logprobs
from bayes_llm.prompts import answer_prompt, model_context, reply_separator


def request_ids(tokenizer, prompt: str, choice: str) -> tuple[list[int], list[int]]:
    """(context, continuation) token ids as lm-eval builds a choice's request (`_encode_pair`): the
    context's trailing whitespace (a chat header's newline) moves to the continuation, the whole text is
    encoded and split after the context's tokens."""
    context = model_context(tokenizer, answer_prompt(prompt))
    continuation = reply_separator(tokenizer) + choice
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    head = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    return head, whole[len(head) :]


@torch.no_grad()
def cloze_scores(model, tokenizer, rows: Sequence[dict], batch_size: int, progress: bool = False) -> list[float]:
    """1.0 where the choice with the highest log-likelihood per character is the row's answer, else 0.0."""
    model.eval()
    sequences, spans, counts = [], [], []
    for row in rows:
        choices = [str(c) for c in row.get("choices") or []]
        if not choices:
            raise ValueError(f"row {row.get('id')}: cloze scoring needs the row's choices")
        for choice in choices:
            context, continuation = request_ids(tokenizer, row["prompt"], choice)
            sequences.append(context + continuation)
            spans.append((len(context), len(continuation), max(len(choice), 1)))
        counts.append(len(choices))
    per_char = torch.empty(len(sequences), dtype=torch.float64)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # less padding, same scores
    for start in tqdm(range(0, len(order), batch_size), desc="cloze", unit="batch", disable=not progress):
        index = order[start : start + batch_size]
        logliks = span_logprobs(model, [sequences[i] for i in index], [spans[i][:2] for i in index],
                                tokenizer.pad_token_id)
        for loglik, i in zip(logliks, index, strict=True):
            per_char[i] = loglik / spans[i][2]
    scores, first = [], 0
    for row, count in zip(rows, counts, strict=True):
        picked = int(per_char[first : first + count].argmax())
        scores.append(float(LETTERS[picked] == str(row["answer"]).strip()))
        first += count
    return scores
