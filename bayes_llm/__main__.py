"""`python -m bayes_llm` = the `bayes-llm` command (for environments without the console script)."""

import sys

from bayes_llm.cli import main

sys.exit(main())
