"""The base model: MambaFormer configs on transformers' hybrid families, tokenizer, loading, pretraining.

Importing this package installs the exact linear-time Mamba-1 scan for Jamba when the mamba-ssm
kernels are absent (see `jamba_scan`).
"""

from bayes_llm.model import jamba_scan

jamba_scan.install()
