"""DVC stage `evaluate`: models + data/prepared → reports/eval/, reports/README.md. Logic: bayes_llm.evaluate."""

import sys

from bayes_llm.cli import main

raise SystemExit(main(["evaluate", *sys.argv[1:]]))
