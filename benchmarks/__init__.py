"""Speed and quality studies, the kernel check: outside the DAG's deps. Run `python -m benchmarks.<name> --help`."""
