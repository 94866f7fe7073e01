"""Tiny randomly initialised checkpoints of every supported family, saved locally by the tests."""

from __future__ import annotations

from pathlib import Path

import transformers as tf

from bayes_llm.model.tokenizer import train_tokenizer

TEXTS = [f"Question: What is {a} + {b}?\nAnswer: {a + b}" for a in range(30) for b in range(10)]


def tiny_config(family: str, vocab_size: int) -> tf.PretrainedConfig:
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    mamba2 = dict(mamba_n_heads=2, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=16)
    configs = {
        "bamba": lambda: tf.BambaConfig(**common, attn_layer_indices=[1], **mamba2),
        "jamba": lambda: tf.JambaConfig(**common, attn_layer_period=2, attn_layer_offset=1, num_experts=1,
                                        expert_layer_period=1, expert_layer_offset=0, router_aux_loss_coef=0.0,
                                        mamba_d_state=8, mamba_dt_rank=4),
        "granitemoehybrid": lambda: tf.GraniteMoeHybridConfig(**common, layer_types=["mamba", "attention"],
                                                              num_local_experts=0, shared_intermediate_size=64,
                                                              position_embedding_type="rope", **mamba2),
        "falcon_h1": lambda: tf.FalconH1Config(**common, mamba_d_ssm=64, **mamba2),
        "zamba2": lambda: tf.Zamba2Config(**common, layers_block_type=["mamba", "hybrid"], n_mamba_heads=2,
                                          mamba_d_state=8, mamba_ngroups=1, chunk_size=16, num_mem_blocks=1,
                                          use_shared_attention_adapter=False),
        "llama": lambda: tf.LlamaConfig(**common),
        "qwen2": lambda: tf.Qwen2Config(**common),
    }  # fmt: skip
    return configs[family]()


FAMILIES = ("bamba", "jamba", "granitemoehybrid", "falcon_h1", "zamba2", "llama", "qwen2")


def save_tiny_checkpoint(family: str, directory: Path) -> Path:
    tokenizer = train_tokenizer(TEXTS, vocab_size=300, max_length=128)
    tf.set_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
