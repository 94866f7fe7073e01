"""MambaFormer configs on transformers' hybrid families: first block Mamba, then alternating.

Models are saved under their family's own `model_type` (bamba / jamba), so stock transformers
loads them in any process (trl's reference model, lm-eval, a user's script) without registering
anything; `config.mambaformer` records the layout this project chose.
"""

from __future__ import annotations

import math

from transformers import BambaConfig, JambaConfig, PretrainedConfig

from bayes_llm.config import ModelParams


def attention_layers(params: ModelParams) -> list[int]:
    if params.attention_layers is not None:
        return sorted(set(params.attention_layers))
    return list(range(1, params.layers, 2))


def build_config(params: ModelParams, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> PretrainedConfig:
    attention = attention_layers(params)
    common = {
        "vocab_size": vocab_size,
        "hidden_size": params.hidden_size,
        "intermediate_size": params.intermediate_size,
        "num_hidden_layers": params.layers,
        "num_attention_heads": params.attention_heads,
        "num_key_value_heads": params.kv_heads,
        "max_position_embeddings": params.max_length,
        "mamba_d_state": params.mamba.d_state,
        "mamba_d_conv": params.mamba.d_conv,
        "mamba_expand": params.mamba.expand,
        "pad_token_id": pad_id,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "tie_word_embeddings": True,
    }
    if params.family == "bamba":
        config = BambaConfig(
            **common,
            attn_layer_indices=attention,
            mamba_n_heads=params.mamba.heads,
            mamba_d_head=params.mamba.expand * params.hidden_size // params.mamba.heads,
            mamba_n_groups=1,
            mamba_chunk_size=params.mamba.chunk_size,
        )
    else:
        period, offset = _jamba_period(attention, params.layers)
        config = JambaConfig(
            **common,
            attn_layer_period=period,
            attn_layer_offset=offset,
            # One expert everywhere: a dense MLP. Jamba keeps an aux router loss by default, which
            # breaks trl with a single expert (STACK-NOTES).
            num_experts=1,
            num_experts_per_tok=1,
            expert_layer_period=1,
            expert_layer_offset=0,
            router_aux_loss_coef=0.0,
            mamba_dt_rank=math.ceil(params.hidden_size / 16),
        )
    config.mambaformer = {"family": params.family, "attention_layers": attention}
    return config


def _jamba_period(attention: list[int], layers: int) -> tuple[int, int]:
    """Jamba places attention by (period, offset); the requested layout must be one of those."""
    for period in range(1, layers + 1):
        for offset in range(period):
            if [i for i in range(layers) if i % period == offset] == attention:
                return period, offset
    raise ValueError(
        f"model.attention_layers {attention}: jamba can only place attention every `period` layers "
        f"from an offset; use a regular layout or family: bamba"
    )
