"""DVC stage `train_expert` (dvc.yaml). Its inputs, outputs and logic: bayes_llm/stages/train_expert.py."""

import sys

from bayes_llm.cli import main

raise SystemExit(main(["train-expert", *sys.argv[1:]]))
