"""DVC stage `calibrate`: base + svd + experts + data/prepared → models/dispatcher/, reports/dispatch/.
Logic: bayes_llm.dispatch."""

import sys

from bayes_llm.cli import main

raise SystemExit(main(["calibrate", *sys.argv[1:]]))
