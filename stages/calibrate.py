"""DVC stage `calibrate` (dvc.yaml). Its inputs, outputs and logic: bayes_llm/stages/calibrate.py."""

import sys

from bayes_llm.cli import main

raise SystemExit(main(["calibrate", *sys.argv[1:]]))
