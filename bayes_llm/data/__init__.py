"""Data: the domain registry, synthetic generators, external sources, and the validated `prepare`."""
