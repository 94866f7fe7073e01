"""DVC stage `evaluate` (dvc.yaml). Its inputs, outputs and logic: bayes_llm/stages/evaluate.py."""

import sys

from bayes_llm.cli import main

raise SystemExit(main(["evaluate", *sys.argv[1:]]))
