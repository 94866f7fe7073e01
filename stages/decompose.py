"""DVC stage `decompose` (dvc.yaml). Its inputs, outputs and logic: bayes_llm/stages/decompose.py."""

import sys

from bayes_llm.cli import main

raise SystemExit(main(["decompose", *sys.argv[1:]]))
