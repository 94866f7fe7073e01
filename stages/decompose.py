"""DVC stage `decompose`: models/base + params svf.targets → models/svd/, reports/svf/decompose.json.
Logic: bayes_llm.svf.decompose."""

from bayes_llm.cli import main

raise SystemExit(main(["decompose"]))
