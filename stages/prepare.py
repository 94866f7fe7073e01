"""DVC stage `prepare` (dvc.yaml). Its inputs, outputs and logic: bayes_llm/stages/prepare.py."""

import sys

from bayes_llm.cli import main

raise SystemExit(main(["prepare", *sys.argv[1:]]))
