"""DVC stage `base` (dvc.yaml). Its inputs, outputs and logic: bayes_llm/stages/base.py."""

import sys

from bayes_llm.cli import main

raise SystemExit(main(["base", *sys.argv[1:]]))
