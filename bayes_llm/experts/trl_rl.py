"""The RL phase through trl (`rl_algorithm: grpo | rloo`): trl's trainers do the sampling, the
group advantages, the loss and the KL; the expert loop keeps validation, the best z and checkpoints.

z is the model's only trainable parameter (SVF parametrizes the target weights), so trl trains z
alone. Our optimizer (constant learning rate) is handed to trl, so a checkpoint holds its state like
the other phases'. A resumed phase restarts trl's sampler with a seed moved by the step: it continues
from the checkpoint's z and optimizer, but is not bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from bayes_llm.config import ExpertParams
from bayes_llm.prompts import answer_prompt, model_context
from bayes_llm.rewards.correctness import correctness


class _PerStep(TrainerCallback):
    """Hands each step's logged loss, reward and KL to the expert loop (logging_steps is 1)."""

    def __init__(self, first_step: int, on_step: Callable[[int, dict], None]) -> None:
        self.first_step, self.on_step = first_step, on_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            record = {"loss": float(logs["loss"]), "reward": float(logs.get("reward", 0.0))}
            record["kl"] = float(logs.get("kl", 0.0))
            # whether the loss reaches z at all, and how many groups had nothing to learn from
            if "grad_norm" in logs:
                record["grad_norm"] = float(logs["grad_norm"])
            if "frac_reward_zero_std" in logs:
                record["zero_std_groups"] = float(logs["frac_reward_zero_std"])
            self.on_step(self.first_step + state.global_step - 1, record)


def trl_phase(
    model,
    tokenizer,
    kind: str,
    train_rows: Sequence[dict],
    cfg: ExpertParams,
    seed: int,
    first_step: int,
    steps: int,
    optimizer: torch.optim.Optimizer,
    on_step: Callable[[int, dict], None],
    bf16: bool = False,
) -> None:
    """`steps` optimizer steps of trl's GRPO or RLOO on `model`; `on_step(global step, record)` after each.
    `bf16`: autocast as the trainer decided (trl's own default is bf16 wherever fp16 is off)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_class, trainer_class = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}[
        cfg.rl_algorithm
    ]
    # As greedy evaluation writes it (BOS or chat turns included): trl adds no special tokens to a plain prompt.
    rows = [{"prompt": model_context(tokenizer, answer_prompt(row["prompt"])), "row": i}
            for i, row in enumerate(train_rows)]  # fmt: skip
    prompts = Dataset.from_list(rows)

    def reward(prompts: list[str], completions: list[str], row: list[int], **_) -> list[float]:
        return correctness(kind, completions, [train_rows[i] for i in row])

    with tempfile.TemporaryDirectory(prefix="bayes-llm-trl-") as output_dir:
        args = config_class(
            output_dir=output_dir,
            per_device_train_batch_size=cfg.rl_batch_size * cfg.num_generations,  # completions per step
            num_generations=cfg.num_generations,
            steps_per_generation=1,
            max_steps=steps,
            temperature=cfg.temperature,
            max_completion_length=cfg.max_new_tokens,
            beta=cfg.beta,
            learning_rate=cfg.rl_learning_rate,
            seed=seed + first_step,
            use_cpu=True,
            bf16=bf16,
            gradient_checkpointing=False,  # trl's default; it would stay switched on in the caller's model
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
        )
        constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        trainer = trainer_class(
            model=model,
            reward_funcs=reward,
            args=args,
            train_dataset=prompts,
            processing_class=tokenizer,
            optimizers=(optimizer, constant),
            callbacks=[_PerStep(first_step, on_step)],
        )
        trainer.remove_callback(PrinterCallback)  # each step's record goes to our curve instead
        trainer.train()
