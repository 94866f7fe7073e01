"""DVC stage `base`: data/prepared + params model/tokenizer/pretrain → models/base/, reports/base/.
Logic: bayes_llm.model.base."""

from bayes_llm.cli import main

raise SystemExit(main(["base"]))
