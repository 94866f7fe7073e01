"""Evaluation: greedy scoring (the stages' quick checks), lm-eval tasks and the `bayes-llm` lm-eval model,
scoring and the reports."""

from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"  # the shipped lm-eval tasks (`--include_path`)
# A letter domain's task answered in writing (bayes_llm_<domain>_gen; stages/evaluate.py)
WRITTEN_SUFFIX = "_gen"
# A letter domain's task scored by its choices' texts (bayes_llm_<domain>_choice; choice_answer: text)
CHOICE_SUFFIX = "_choice"
