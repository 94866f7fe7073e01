"""Deterministic synthetic generators: each yields candidate rows forever from a seeded RNG."""
