"""DVC stage `train_expert@<domain>`: base + svd + data/prepared/<domain> + params experts.<domain>
→ models/experts/<domain>.safetensors, reports/experts/<domain>*. Logic: bayes_llm.experts."""

import sys

from bayes_llm.cli import main

raise SystemExit(main(["train-expert", *sys.argv[1:]]))
