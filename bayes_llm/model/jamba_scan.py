"""A linear-time PyTorch selective scan for Jamba's Mamba-1 blocks, used only without mamba-ssm.

transformers' reference scan indexes the time axis (`x[:, :, t]`) inside its loop; in backward each
index builds a zero tensor the size of the whole sequence, so a training step is O(L²). This scan is
O(L) and also keeps its per-token cost as L grows:

- time-major layout (T, batch, width, state): each step reads and writes one contiguous block. In
  the (batch, width, T, state) layout a step gathers rows one T·state stride apart, which costs
  more the longer T is;
- its own backward (the adjoint recurrence λ_t = C_t g_t + a_(t+1) λ_(t+1)): one in-place op per
  step each way instead of autograd's graph of several nodes per step, whose fixed cost dominated
  short steps (small batch × long T);
- the readout by C and its gradient as batched matmuls over all steps at once.

The same recurrence as the reference up to float rounding (tested on outputs and gradients).
Measured on this CPU: reports/base/benchmark.json.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F


class _Recurrence(torch.autograd.Function):
    """h_t = a_t h_(t-1) + u_t from h_(-1) = 0, read out as y_t = h_t · C_t; tensors time-major."""

    @staticmethod
    def forward(ctx, decay: torch.Tensor, inputs: torch.Tensor, C: torch.Tensor):
        # decay, inputs: (T, batch, width, state); C: (T, batch, state); all contiguous fp32
        states = torch.empty_like(inputs)
        state = torch.zeros_like(inputs[0])
        for t in range(inputs.shape[0]):
            state = torch.addcmul(inputs[t], decay[t], state, out=states[t])
        ctx.save_for_backward(decay, C, states)
        steps, batch, width, size = states.shape
        readout = torch.bmm(states.view(steps * batch, width, size), C.view(steps * batch, size, 1))
        return readout.view(steps, batch, width), state.clone()  # a copy: the cache may update it in place

    @staticmethod
    def backward(ctx, grad_readout: torch.Tensor, grad_last: torch.Tensor | None):
        decay, C, states = ctx.saved_tensors
        steps, batch, width, size = states.shape
        grad_readout = grad_readout.contiguous().view(steps * batch, 1, width)
        # λ_t = dL/dh_t: what y_t reads directly, plus what flows back from h_(t+1)
        lam = torch.bmm(grad_readout.transpose(1, 2), C.view(steps * batch, 1, size)).view(states.shape)
        if grad_last is not None:
            lam[-1] += grad_last
        for t in range(steps - 2, -1, -1):
            torch.addcmul(lam[t], decay[t + 1], lam[t + 1], out=lam[t])
        grad_decay = torch.zeros_like(decay)
        torch.mul(lam[1:], states[:-1], out=grad_decay[1:])
        grad_C = torch.bmm(grad_readout, states.view(steps * batch, width, size)).view(C.shape)
        return grad_decay, lam, grad_C


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
    input_dtype = hidden_states.dtype
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    time_major = lambda t: t.permute(2, 0, 1).float().contiguous()  # noqa: E731  (b, ·, T) → (T, b, ·)
    dt, x = time_major(dt)[..., None], time_major(hidden_states)[..., None]
    decay = torch.exp(A.float() * dt)
    inputs = (dt * x) * time_major(B)[:, :, None]
    readout, last_state = _Recurrence.apply(decay, inputs, time_major(C))
    scan_output = readout.permute(1, 2, 0).to(input_dtype)
    if D is not None:
        scan_output = scan_output + hidden_states * D[None, :, None]
    if z is not None:
        scan_output = scan_output * F.silu(z)
    return (scan_output, last_state) if return_last_state else scan_output


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
