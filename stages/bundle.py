"""DVC stage `bundle` (dvc.yaml). Its inputs, outputs and logic: bayes_llm/stages/bundle.py."""

import sys

from bayes_llm.cli import main

raise SystemExit(main(["bundle", *sys.argv[1:]]))
