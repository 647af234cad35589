"""The autograd functions of the fused LoRA layers over frozen 4-bit (NF4/FP4) weights, and their math helpers.

peft's path clones every base output, scales and adds the adapter output in separate kernels, and lets autograd save
and replay all of it; here the adapter lands in the base output through one addmm, and backward needs one big matmul
(grad input through the re-dequantized weight) plus rank-r ones. Nothing larger than the layer input is saved.
With speed.fp8_matmul the two big matmuls (X W^T and dY W) run in float8 where the layer takes that path (fp8.py).

Notation: W the frozen weight [out, in] (dequantized when needed), A [r, in] and B [out, r] the adapter, s its
scaling, X the layer input, X' = dropout(X) the adapter's input, dY the output gradient.
"""

from __future__ import annotations

import functools
import math

import torch

from qlora_kit.speed.fp8 import fp8_grad_input, fp8_linear
from qlora_kit.speed.nf4_triton import nf4_dequantize


class LoraOver4bit(torch.autograd.Function):
    """A LoRA layer over a frozen 4-bit weight (peft's Linear4bit in training), forward and backward by hand.

    Y   = X W^T (+ bias) + s (X' A^T) B^T        X' = dropout(X); `x_lora` None: X' = X
    dX  = dY W (+ s (dY B) A when X' = X)        the one big matmul, through the re-dequantized W
    dX' = s (dY B) A
    dA  = s (dY B)^T X'
    dB  = s dY^T (X' A^T)

    Matmuls run in the layer's compute dtype (as under autocast); A and B may be fp32 master weights, and their
    gradients come back in their own dtype. Saved for backward: X' and its rank-r projection X' A^T.
    """

    @staticmethod
    def forward(ctx, x, x_lora, lora_a, lora_b, layer, scaling, cast_once=True):
        dtype = layer.compute_dtype or x.dtype
        xc = x.to(dtype)
        xl2 = (xc if x_lora is None else x_lora.to(dtype)).reshape(-1, x.shape[-1])
        bias = None if layer.bias is None else layer.bias.to(dtype)
        a, b = in_compute_dtype(lora_a, dtype, cast_once), in_compute_dtype(lora_b, dtype, cast_once)
        out, xa = frozen_matmul_plus_adapter(xc, xl2, a, b, layer, scaling, x.dtype, bias, source=x)
        ctx.layer, ctx.scaling, ctx.same_input = layer, scaling, x_lora is None
        ctx.dtypes = (x.dtype, (x if x_lora is None else x_lora).dtype, lora_a.dtype, lora_b.dtype)
        ctx.save_for_backward(xl2, xa, a, b)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xl2, xa, a, b = ctx.saved_tensors
        layer, s = ctx.layer, ctx.scaling
        x_dtype, xl_dtype, a_dtype, b_dtype = ctx.dtypes
        dtype = xa.dtype
        batch_shape = grad_out.shape[:-1]
        g = grad_out.to(dtype).reshape(-1, grad_out.shape[-1])
        need_x, need_xl, need_a, need_b = ctx.needs_input_grad[:4]
        grad_xa = adapter_output_grad(g, b, s)
        grad_x = grad_xl = grad_a = grad_b = None
        if need_x:
            grad_x = frozen_grad_input(g, layer, dtype)
            if ctx.same_input:
                grad_x.addmm_(grad_xa, a)
            grad_x = grad_x.view(*batch_shape, -1).to(x_dtype)
        if not ctx.same_input and need_xl:
            grad_xl = torch.mm(grad_xa, a).view(*batch_shape, -1).to(xl_dtype)
        if need_a:
            grad_a = matmul_into(grad_xa.t(), xl2, a_dtype)
        if need_b:
            grad_b = adapter_b_grad(g, xa, s, b_dtype)
        return grad_x, grad_xl, grad_a, grad_b, None, None, None


def frozen_matmul_plus_adapter(x, x_lora2d, a, b, layer, scaling, out_dtype, bias=None, source=None):
    """x W^T (+ bias) + s (x' A^T) B^T in the compute dtype of x (that of `a` and `b` too), returned in `out_dtype`,
    and x' A^T (rank r, what backward keeps). `x_lora2d` is the adapter's input x' flattened to 2-D; `source` the
    tensor x was cast from, whose float8 cast the next layer reading it may share (fp8.input_in_fp8)."""
    if runs_in_fp8(layer, x):
        out = fp8_linear(x.reshape(-1, x.shape[-1]), layer, source).view(*x.shape[:-1], layer.out_features)
        if bias is not None:
            out.add_(bias)
    else:  # what bitsandbytes does for a batch this size (dequantize, then one matmul), with our dequantize
        out = torch.nn.functional.linear(x, dequantized_weight(layer, x.dtype), bias)
    xa = torch.mm(x_lora2d, a.t())
    # The adapter lands on the base output in place. Writing it first and letting the big matmul accumulate onto it
    # (beta=1) gained for gate/up in one H100 run of three and lost for k/v (scripts/adapter_add_bench.py).
    out.view(-1, out.shape[-1]).addmm_(xa, b.t(), alpha=scaling)
    return out.to(out_dtype), xa


def frozen_grad_input(g: torch.Tensor, layer, dtype: torch.dtype) -> torch.Tensor:
    """dY W for the output gradient `g` (2-D, compute dtype): the one big matmul of backward, in float8 where the
    layer takes that path."""
    if runs_in_fp8(layer, g):
        return fp8_grad_input(g, layer)
    return torch.mm(g, dequantized_weight(layer, dtype))


def runs_in_fp8(layer, x: torch.Tensor) -> bool:
    """speed.fp8_matmul put this layer on the float8 path (patches.use_fused_lora) and x is bf16 with rows."""
    return getattr(layer, "_fp8_matmul", False) and x.dtype == torch.bfloat16 and x.numel() > 0


def adapter_output_grad(g: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """d loss / d (x' A^T) from the output gradient `g` (2-D) and B, both in the compute dtype: rank r, small."""
    return torch.mm(g, b).mul_(scaling)


_copies_generation = [0]  # bumped by forget_compute_copies


def in_compute_dtype(weight: torch.Tensor, dtype: torch.dtype, cast_once: bool = True) -> torch.Tensor:
    """An fp32 master adapter weight cast to the compute dtype once per change, not in every call.

    Forward, checkpointed recompute and backward each need the bf16 copy: cast per call, that is about 1,600 small
    cast kernels per 8B step. A copy is reused while the weight's version counter (bumped by in-place updates through
    torch: optimizers, checkpoint loads) and storage stay the same, and until the trainer's next optimizer step (the
    speed plan's callback forgets them all then: an optimizer writing through its own kernels may not bump the
    counter). It costs 2 bytes per adapter parameter, so the long-context settings (memory first) cast in every call
    instead (`cast_once` false). A CUDA graph capture (speed.cuda_graphs) casts too: the graph reads its copy at
    every replay, so a copy kept from outside it would never see the weight change.
    """
    if weight.dtype == dtype or not cast_once or weight.is_cuda and torch.cuda.is_current_stream_capturing():
        return weight.to(dtype)
    key = (weight._version, weight.data_ptr(), dtype, _copies_generation[0])
    cached = getattr(weight, "_qlora_kit_compute_copy", None)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(dtype))
        weight._qlora_kit_compute_copy = cached
    return cached[1]


def forget_compute_copies() -> None:
    """Every cached compute-dtype copy is stale from now on (each is replaced at its weight's next use)."""
    _copies_generation[0] += 1


def adapter_b_grad(g: torch.Tensor, xa: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """d loss / d B in `dtype` (B's own) from the output gradient `g` (2-D) and the saved x' A^T."""
    return matmul_into(g.t(), xa, dtype).mul_(scaling)


MM_OUT_DTYPE = torch.__version__ >= "2.8"  # torch.mm(..., out_dtype=torch.float32) from bf16/fp16, CUDA


def matmul_into(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b in `dtype`. An fp32 adapter weight's gradient from bf16/fp16 inputs comes out of the GEMM in fp32 on
    CUDA (torch >= 2.8): one kernel instead of a matmul and a cast, and the result is not rounded to bf16 first."""
    if MM_OUT_DTYPE and dtype == torch.float32 and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).to(dtype)


class GatedDownOver4bit(torch.autograd.Function):
    """down_proj(act(gate) * up) for a LoRA down projection over a 4-bit weight, without saving act(gate) * up;
    act is SiLU (Llama, Mistral, Qwen, Phi-3) or GELU's tanh form (Gemma 2 and 3).

    H   = act(G) * U                             recomputed in backward, not saved
    Y   = H W^T + s (H A^T) B^T
    dH  = dY W + s (dY B) A
    dG  = dH * U * act'(G)
    dU  = dH * act(G)
    dA  = s (dY B)^T H
    dB  = s dY^T (H A^T)

    H is as wide as G and U, and the plain path keeps all three per layer (the activation saves G and U, the down
    projection its input). Backward recomputes H from G and U, which the activation's backward reads anyway: one
    intermediate-sized tensor less per layer that keeps its activations.

    `output_read` false: the caller knows nothing will read the output (a checkpointed layer's recompute, see
    patches.fused_mlp_forward), so the down projection's matmul is skipped; backward is the same.
    """

    @staticmethod
    def forward(ctx, gate, up, lora_a, lora_b, layer, scaling, cast_once=True, output_read=True, activation="silu"):
        dtype = layer.compute_dtype or gate.dtype
        h = gated_mul(gate, up, activation).to(dtype)
        a, b = in_compute_dtype(lora_a, dtype, cast_once), in_compute_dtype(lora_b, dtype, cast_once)
        if output_read:
            out, xa = frozen_matmul_plus_adapter(h, h.reshape(-1, h.shape[-1]), a, b, layer, scaling, gate.dtype)
        else:  # only what backward needs; NaN, so that a reader the caller did not foresee fails loudly
            xa = torch.mm(h.reshape(-1, h.shape[-1]), a.t())
            out = torch.full((*gate.shape[:-1], layer.out_features), float("nan"), dtype=gate.dtype,
                             device=gate.device)
        ctx.layer, ctx.scaling, ctx.activation = layer, scaling, activation
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.save_for_backward(gate, up, xa, a, b)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, xa, a, b = ctx.saved_tensors
        layer, s, activation = ctx.layer, ctx.scaling, ctx.activation
        a_dtype, b_dtype = ctx.dtypes
        dtype = xa.dtype
        g = grad_out.to(dtype).reshape(-1, grad_out.shape[-1])
        grad_xa = adapter_output_grad(g, b, s)
        grad_b = adapter_b_grad(g, xa, s, b_dtype)
        h2 = gated_mul(gate, up, activation).to(dtype).reshape(-1, gate.shape[-1])  # recomputed, not saved
        grad_a = matmul_into(grad_xa.t(), h2, a_dtype)
        del h2
        if runs_in_fp8(layer, g):
            grad_h = fp8_grad_input(g, layer).addmm_(grad_xa, a)
        else:
            # The rank-r term first, then the big matmul accumulates onto it (beta=1): for this output, as wide as
            # the MLP, that measured 4-7% faster than adding the rank-r term afterwards (scripts/adapter_add_bench.py).
            grad_h = torch.mm(grad_xa, a).addmm_(g, dequantized_weight(layer, dtype))
        grad_gate, grad_up = gated_mul_backward(gate, up, grad_h.view(gate.shape).to(gate.dtype), activation)
        return grad_gate, grad_up, grad_a, grad_b, None, None, None, None, None


SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def gated_mul(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """act(gate) * up as Liger computes it (act in fp32, cast to up's dtype, times up): its Triton kernel on a GPU
    with liger-kernel, the same arithmetic in torch ops elsewhere. activation: "silu" or "gelu_tanh"."""
    kernels = gate_kernels(gate, activation)
    if kernels is not None:
        gate, up = gate.contiguous(), up.contiguous()
        return kernels[0](liger_rows(gate), liger_rows(up))[2].view(gate.shape)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(gate.float(), approximate="tanh").to(up.dtype) * up
    return torch.nn.functional.silu(gate.float()).to(up.dtype) * up


def gated_mul_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, activation: str = "silu"):
    """Gradients of act(gate) * up for gate and up. Liger's kernels write them over gate and up (saved tensors that
    nothing reads afterwards); the torch-ops version allocates."""
    kernels = gate_kernels(gate, activation)
    if kernels is not None:
        gate, up = gate.contiguous(), up.contiguous()
        grad_gate, grad_up = kernels[1](liger_rows(gate), liger_rows(up), liger_rows(grad.contiguous()))
        return grad_gate.view(gate.shape), grad_up.view(up.shape)
    x = gate.float()
    if activation == "gelu_tanh":  # gelu(x) = x/2 (1 + tanh(z)), z = sqrt(2/pi) (x + 0.044715 x^3)
        tanh = torch.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x**3))
        act = 0.5 * x * (1 + tanh)
        slope = 0.5 * (1 + tanh) + 0.5 * x * (1 - tanh * tanh) * SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
    else:  # silu(x) = x sigmoid(x)
        sig = torch.sigmoid(x)
        act = x * sig
        slope = act * (1 - sig) + sig
    grad_up = (grad.float() * act).to(up.dtype)
    grad_gate = (grad.float() * slope * up.float()).to(gate.dtype)
    return grad_gate, grad_up


def gate_kernels(gate: torch.Tensor, activation: str):
    """Liger's (forward, backward) for act(gate) * up where they run: CUDA tensors and liger-kernel installed."""
    return liger_gate_kernels(activation) if gate.is_cuda else None


LIGER_ROW = 4096  # elements per row handed to Liger's elementwise kernels: a power of two, so no lane idles


def liger_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor viewed as rows of LIGER_ROW elements where its size allows (else as it is), for Liger's
    gated-activation kernels. They run one program per row, its width rounded up to a power of two and compiled per
    width: an 18,944-wide MLP (Qwen2.5-7B) would leave 42% of every program's lanes masked and compile a kernel of
    its own. The op is elementwise, so any row split of the same memory computes the same values."""
    return tensor.view(-1, LIGER_ROW) if tensor.numel() % LIGER_ROW == 0 else tensor


@functools.cache
def liger_gate_kernels(activation: str):
    """(forward, backward) of Liger's kernels for act(gate) * up (swiglu_* for "silu", geglu_* for "gelu_tanh":
    GELU's tanh form) when liger-kernel is installed, else None (imported on first use: Triton is slow to import and
    absent on CPU-only machines)."""
    try:
        from liger_kernel.ops import geglu_backward, geglu_forward, swiglu_backward, swiglu_forward
    except ImportError:
        return None
    if activation == "gelu_tanh":
        return geglu_forward, geglu_backward
    return swiglu_forward, swiglu_backward


def dequantized_weight(layer, dtype: torch.dtype) -> torch.Tensor:
    """The frozen 4-bit weight as a dense [out, in] matrix, made for one matmul and dropped after it: through
    qlora-kit's Triton kernel where speed.triton_dequantize is on and it applies (the same bits, in one kernel at
    about 1.6x bitsandbytes' speed), else bitsandbytes'."""
    import bitsandbytes as bnb

    packed, state = layer.weight.data, layer.weight.quant_state
    if getattr(layer, "_triton_dequantize", False) and state.dtype == dtype:
        return nf4_dequantize(packed, state)
    return bnb.functional.dequantize_4bit(packed, state).to(dtype)
