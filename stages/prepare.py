"""DVC stage `prepare`: params `data` → data/prepared/, reports/data/. Logic: bayes_llm.data.prepare."""

from bayes_llm.cli import main

raise SystemExit(main(["prepare"]))
