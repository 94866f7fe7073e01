"""A linear-time PyTorch selective scan for Jamba's Mamba-1 blocks, used only without mamba-ssm.

transformers' reference scan indexes the time axis (`x[:, :, t]`) inside its loop; in backward each
index builds a zero tensor the size of the whole sequence, so a training step is O(L²). Unbinding
the time axis once gives the same arithmetic in the same order (the forward is bit-identical) with
an O(L) backward. Measured on this CPU: 75 tok/s → ~1.4k tok/s at T=128, and T=1024 becomes usable.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F


def linear_selective_scan(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    **_: object,
):
    """Same contract as `transformers.models.jamba.modeling_jamba.mamba_selective_scan`."""
    batch_size, intermediate_size, _seq_len = hidden_states.shape
    input_dtype = hidden_states.dtype
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    B, C = B.transpose(1, 2), C.transpose(1, 2)
    discrete_A = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
    deltaB_u = (dt[:, :, :, None] * B[:, None, :, :].float()) * hidden_states[:, :, :, None].float()
    state = torch.zeros(batch_size, intermediate_size, A.shape[-1], dtype=input_dtype, device=hidden_states.device)
    outputs = []
    for a_t, bu_t, c_t in zip(discrete_A.unbind(2), deltaB_u.unbind(2), C.unbind(1), strict=True):
        state = a_t * state + bu_t
        outputs.append(torch.matmul(state.to(input_dtype), c_t.unsqueeze(-1))[:, :, 0])
    scan_output = torch.stack(outputs, dim=-1)
    if D is not None:
        scan_output = scan_output + hidden_states * D[None, :, None]
    if z is not None:
        scan_output = scan_output * F.silu(z)
    return (scan_output, state) if return_last_state else scan_output


def kernels_available() -> bool:
    return importlib.util.find_spec("mamba_ssm") is not None


def install() -> bool:
    """Route Jamba's PyTorch scan to the linear one; a no-op when the mamba-ssm kernels are there."""
    if kernels_available():
        return False
    from transformers.models.jamba import modeling_jamba

    if getattr(modeling_jamba, "_reference_selective_scan", None) is None:
        modeling_jamba._reference_selective_scan = modeling_jamba.mamba_selective_scan
    modeling_jamba.mamba_selective_scan = linear_selective_scan
    return True
