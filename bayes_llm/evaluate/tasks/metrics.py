"""The functions the task YAMLs name (`!function metrics.<name>`). lm-eval loads this file by path,
as a fresh module per YAML, so the logic lives in a real package module, bayes_llm.evaluate.scoring
(and the verdicts on code, kept for the process, in bayes_llm.rewards.code)."""

from bayes_llm.evaluate.scoring import (
    choice_texts,
    code_item,
    letter_choices,
    letter_match,
    letter_target,
    number_match,
    pass_at_1,
)

__all__ = ["choice_texts", "code_item", "letter_choices", "letter_match", "letter_target", "number_match", "pass_at_1"]
