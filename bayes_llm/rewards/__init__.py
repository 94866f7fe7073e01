"""Correctness rewards per domain, and the sandbox that runs generated or dataset code."""
