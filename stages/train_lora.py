"""DVC stage `train_lora`: base + train splits → models/lora/, reports/lora/. Logic: bayes_llm.baselines.lora."""

import sys

from bayes_llm.cli import main

raise SystemExit(main(["train-lora", *sys.argv[1:]]))
