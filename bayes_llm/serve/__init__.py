"""The OpenAI-compatible server: `bayes-llm serve`."""
