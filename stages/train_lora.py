"""DVC stage `train_lora` (dvc.yaml). Its inputs, outputs and logic: bayes_llm/stages/train_lora.py."""

import sys

from bayes_llm.cli import main

raise SystemExit(main(["train-lora", *sys.argv[1:]]))
