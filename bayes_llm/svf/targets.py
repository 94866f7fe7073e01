"""Which weight matrices SVF adapts: module-name patterns, with presets for every supported family.

A preset is a list of regular expressions matched (`re.search`) against the names of the model's
`nn.Linear` modules; the output head and embeddings are never targets. Names are the module paths of
the loaded model (e.g. `model.layers.0.feed_forward.up_proj`), so a pattern list also works for a
family the presets do not know.
"""

from __future__ import annotations

import re

from torch import nn

from bayes_llm.errors import UserError

_MLP = r"\.(feed_forward|mlp|shared_mlp)\.(gate_proj|up_proj|down_proj|gate_up_proj|input_linear|output_linear)$"
_ATTN = r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$"
# Mamba-1 (Jamba) also has the x (B, C, dt) and dt projections; Mamba-2 fuses them into in_proj.
_MAMBA = r"\.mamba\.(in_proj|out_proj|x_proj|dt_proj)$"

PRESETS: dict[str, list[str]] = {
    "mlp": [_MLP],  # the official Transformer² choice
    "attn": [_ATTN],
    "mamba": [_MAMBA],
    "all": [_MLP, _ATTN, _MAMBA],
}


class TargetError(UserError):
    pass


def patterns_of(targets: str | list[str]) -> list[str]:
    if isinstance(targets, str):
        if targets not in PRESETS:
            raise TargetError(f"svf.targets: unknown preset {targets!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[targets]
    return list(targets)


def select_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Names of the `nn.Linear` modules to adapt, in model order; an error when nothing matches."""
    compiled = []
    for pattern in patterns_of(targets):
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise TargetError(f"svf.targets: invalid pattern {pattern!r}: {error}") from None
    # named_modules() yields a shared module (Zamba2's shared transformer) once: adapt it once.
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(p.search(name) for p in compiled)
    ]
    if not names:
        family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise TargetError(f"svf.targets {targets!r} matches no linear layer of this {family} model")
    return names
