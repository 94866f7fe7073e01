"""The two-pass adaptation engine: identify the task, blend the experts, answer with the adapted weights."""
