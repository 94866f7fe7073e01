"""Evaluation: greedy exact match per domain (here), the lm-eval model and reports (later)."""
