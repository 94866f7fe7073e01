"""DVC stage `bundle`: experts + dispatcher + reports → bundles/<name>/. Logic: bayes_llm.bundle."""

import sys

from bayes_llm.cli import main

raise SystemExit(main(["bundle", *sys.argv[1:]]))
