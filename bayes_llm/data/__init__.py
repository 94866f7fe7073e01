"""Data: the domain registry, synthetic generators, external sources, validation, reading prepared splits."""
