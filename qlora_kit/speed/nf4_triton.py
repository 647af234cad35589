"""One op: bitsandbytes' NF4 dequantize as a Triton kernel, for the fused LoRA layers (GPU only; Triton has no CPU
path).

bitsandbytes' CUDA kernel reaches about half of an H200's memory bandwidth (36.8 us for an average 8B weight,
2.2 TB/s), and double quantization adds two more kernels per call (the 8-bit absmax, then its offset).
This kernel reads the packed weight and the double-quantized absmax once and writes the dense matrix in one pass,
with bitsandbytes' arithmetic (fp32 products, the offset added after rounding, round-to-nearest-even cast), so the
result is the same bits.
"""

from __future__ import annotations

import contextlib
import functools

import torch

BYTES_PER_PROGRAM = 1024  # packed bytes per Triton program (2,048 weights) and its warps: the fastest of those
WARPS = 4  # tried on an H200 for every 8B weight shape (scripts/dequant_kernel_bench.py --sweep)


@functools.cache
def nf4_dequantize_kernel():
    """The compiled-on-first-use Triton kernel, or None where Triton is not installed."""
    try:
        import triton
        import triton.language as tl
        from triton.language.extra import libdevice
    except ImportError:
        return None

    @triton.jit
    def dequantize(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, n_bytes, n_values,
                   inverse_ptr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                   BYTES: tl.constexpr, FP8: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BYTES
        index = start + tl.arange(0, BYTES)
        inside = index < n_bytes
        byte = tl.load(packed_ptr + index, mask=inside, other=0).to(tl.int32)
        block = (index * 2) // BLOCKSIZE
        if NESTED:
            absmax_code = tl.load(absmax_ptr + block, mask=inside, other=0).to(tl.int32)
            scaled = tl.load(code2_ptr + absmax_code) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=inside,
                                                                  other=0.0)
            absmax = libdevice.add_rn(scaled, tl.load(offset_ptr))  # rounded product, then the offset: no FMA
        else:
            absmax = tl.load(absmax_ptr + block, mask=inside, other=0.0)
        high = tl.load(code_ptr + (byte >> 4)) * absmax
        low = tl.load(code_ptr + (byte & 15)) * absmax
        values = tl.interleave(high, low)
        if FP8:  # speed/fp8.py: times the tensor's inverse scale, within e4m3's range
            values = tl.minimum(tl.maximum(values * tl.load(inverse_ptr), -448.0), 448.0)
        out_index = 2 * start + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + out_index, values.to(out_ptr.dtype.element_ty), mask=out_index < n_values)

    return dequantize


def nf4_dequantize(packed: torch.Tensor, state, out: torch.Tensor | None = None,
                   fp8_inverse: torch.Tensor | None = None) -> torch.Tensor:
    """The dense [out, in] weight of a bitsandbytes NF4 weight (`packed` and its QuantState) in state.dtype, written
    into `out` (contiguous, that shape and dtype) when given. CUDA tensors; see nf4_dequantize_applies. With
    `fp8_inverse` (1 element, fp32): the weight times it, in float8 e4m3 (speed/fp8.py)."""
    kernel = nf4_dequantize_kernel()
    if out is None:
        dtype = state.dtype if fp8_inverse is None else torch.float8_e4m3fn
        out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    n_bytes = packed.numel()
    pointers, constants = quant_state_arguments(state)
    grid = (-(-n_bytes // BYTES_PER_PROGRAM),)
    with on_device(packed):
        kernel[grid](packed, *pointers, out, n_bytes, out.numel(), pointers[-1] if fp8_inverse is None else fp8_inverse,
                     BYTES=BYTES_PER_PROGRAM, FP8=fp8_inverse is not None, num_warps=WARPS, **constants)
    return out


def quant_state_arguments(state) -> tuple[tuple[torch.Tensor, ...], dict[str, int | bool]]:
    """What the NF4 kernels (this one, fp8.py's transposing one) read of a QuantState: the pointers absmax, code,
    absmax2, code2, offset (the last three unused without double quantization, so any valid pointer), and the
    constexprs NESTED, BLOCKSIZE, BLOCKSIZE2."""
    nested = bool(state.nested)
    pointers = (state.absmax, state.code, state.state2.absmax if nested else state.absmax,
                state.state2.code if nested else state.code, state.offset if nested else state.absmax)
    return pointers, {"NESTED": nested, "BLOCKSIZE": state.blocksize,
                      "BLOCKSIZE2": state.state2.blocksize if nested else 1}


def on_device(tensor: torch.Tensor):
    """The tensor's GPU as the current device for a kernel launch: a no-op (no device switch each way, host time
    on every call) where it is current already, as it is with one GPU per process."""
    if tensor.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


def nf4_dequantize_applies(packed: torch.Tensor, state) -> bool:
    """The kernel covers this weight: NF4 on CUDA with Triton, an even block size, a 16-entry code, contiguous."""
    return (packed.is_cuda and state.quant_type == "nf4" and packed.dtype == torch.uint8 and packed.is_contiguous()
            and state.blocksize % 2 == 0 and state.code.numel() == 16 and nf4_dequantize_kernel() is not None)
