"""Correctness rewards per domain; model-written code runs in the sandbox and is judged by replaying its
tests outside it."""
