"""Prefect flows of the bayes-llm pipeline (the logic lives in `bayes_llm.pipeline` / `bayes_llm.bundle.publish`)."""
