"""The classification expert: an SVF z trained to name a prompt's domain, on train splits only.

It is trained by next-token loss on `Task: <prompt> / Domain: <label>` (the pretraining format of
the first pass), drawing the domain uniformly and then a train row, so a large domain does not
drown a small one. The official code builds this data from test splits; this never reads them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from bayes_llm.dispatch.controller import OTHER
from bayes_llm.errors import UserError
from bayes_llm.experts.objectives import sft_batch, sft_loss
from bayes_llm.prompts import classify_question
from bayes_llm.svf.scaling import SVF


def train_classifier(
    svf: SVF,
    tokenizer,
    train_prompts: Mapping[str, Sequence[str]],
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """(z, loss per step). `train_prompts`: domain → its train prompts."""
    domains = [d for d in train_prompts if train_prompts[d]]
    if not domains:
        raise UserError("the classification expert needs train prompts of at least one domain")
    labels = [d for d in train_prompts if d != OTHER] + [OTHER]  # the controller's label order, as pass 1 asks

    def question(prompt: str) -> str:
        return classify_question(tokenizer, prompt, labels)

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(svf.parameters(), lr=learning_rate, weight_decay=0.0)
    svf.model.train()
    losses = []
    for _ in tqdm(range(steps), desc="classification expert", unit="step", disable=not progress):
        rows = []
        for _ in range(batch_size):
            domain = rng.choice(domains)
            rows.append({"prompt": rng.choice(train_prompts[domain]), "answer": domain})
        loss = sft_loss(svf.model, sft_batch(tokenizer, rows, template=question))
        if not math.isfinite(loss.item()):
            raise UserError(f"classification expert: loss became {loss.item()} at step {len(losses) + 1}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    svf.model.eval()
    return svf.z(), losses
