"""FP8 matmuls through the frozen NF4 weights (speed.fp8_matmul): the big matmuls of the fused LoRA layers in float8.

A QLoRA step spends about three quarters of its GPU time in two matmuls per layer: X W^T forward (and again in a
checkpointed layer's recompute) and dY W backward, with W the dequantized frozen weight. An H100/H200 runs float8
matmuls at twice the bf16 rate, and W is frozen and already 4-bit: here it is dequantized straight to float8 (e4m3,
one scale for the whole tensor: e4m3's 2^17 of range holds every NF4 level times every block scale of a weight), and
X and dY are cast to float8 with one scale per row (a token's activations or gradient), as torchao's rowwise float8
recipe does.
The products accumulate in fp32 and come out in bf16, scaled back. The adapter's matmuls stay in bf16.

The cost is rounding: e4m3 keeps 3 mantissa bits, so each operand element moves by up to 1/16 of itself, about a
quarter of NF4's own step; over a K-long dot product the errors mostly cancel (docs/benchmarks.md: a projection's
output moves by 3.7% RMS, training losses by 0.35% on average).
"""

from __future__ import annotations

import functools
import weakref

import torch

from qlora_kit.speed.nf4_triton import nf4_dequantize, on_device, quant_state_arguments

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
ROW_BLOCK = 1024  # columns per loop step of the row-cast kernel
TILE_ROWS, TILE_BYTES = 128, 64  # the transposing NF4 -> fp8 kernel's tile: 128 rows x 128 weights
FP8_MIN_WIDTH = 2048  # narrower weights stay in bf16 (fp8_applies)
FP8_MIN_TOKENS = 8192  # speed.fp8_matmul auto: micro-batches of fewer tokens stay in bf16 (plan.choose_fp8_matmul)
FP8_MIN_TOKENS_GRAPHED = 4096  # ... where the layers replay CUDA graphs (measured faster there from 4,096)


@functools.cache
def float8_matmul_works() -> bool:
    """This GPU and torch build run the rowwise-scaled float8 matmul the fused layers call: tried once on a tiny
    product. Compute capability 8.9+ has float8, but rowwise scaling needed Hopper in torch builds before 2.7, and
    cuBLAS refused it on a Blackwell workstation card (pytorch#192707): a try says more than a version table."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9) or not hasattr(torch, "_scaled_mm"):
        return False
    try:
        ones = torch.ones(32, 32, device="cuda").to(FP8)
        out = torch._scaled_mm(ones, ones.t(), scale_a=torch.ones(32, 1, device="cuda"),
                               scale_b=torch.full((1, 32), 0.5, device="cuda"), out_dtype=torch.bfloat16)
        return bool((out == 16).all())
    except Exception:  # whatever refuses the product (a RuntimeError from cuBLAS or CUTLASS, an unbuilt kernel)
        return False


def fp8_applies(layer) -> bool:
    """A frozen 4-bit weight takes the float8 path: NF4 through qlora-kit's dequantize kernel (set on the layer by
    patches.use_fused_lora), bf16 compute, both widths multiples of 16 (what float8 matmuls require) and at least
    FP8_MIN_WIDTH: a narrower matmul (Llama-3-8B's k/v projections, 1,024 wide) ran slower in float8 than in bf16
    once its casts are counted (scripts/fp8_matmul_bench.py, docs/benchmarks.md)."""
    widths = (layer.in_features, layer.out_features)
    return (getattr(layer, "_triton_dequantize", False) and layer.compute_dtype == torch.bfloat16
            and all(width % 16 == 0 and width >= FP8_MIN_WIDTH for width in widths))


@functools.cache
def fp8_kernels():
    """(rows_to_fp8, nf4_to_fp8_transposed): the Triton kernels, compiled on first use; None without Triton."""
    try:
        import triton
        import triton.language as tl
        from triton.language.extra import libdevice
    except ImportError:
        return None

    @triton.jit
    def rows_to_fp8(x_ptr, out_ptr, scale_ptr, cols, stride, BLOCK: tl.constexpr):
        # one program per row: its largest magnitude, then the row scaled to +-448 and cast
        row = tl.program_id(0).to(tl.int64)
        source = x_ptr + row * stride
        largest = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, cols, BLOCK):
            index = start + tl.arange(0, BLOCK)
            largest = tl.maximum(largest, tl.abs(tl.load(source + index, mask=index < cols, other=0.0).to(tl.float32)))
        scale = tl.maximum(tl.max(largest, 0), 1e-30) / 448.0
        tl.store(scale_ptr + row, scale)
        for start in range(0, cols, BLOCK):
            index = start + tl.arange(0, BLOCK)
            value = tl.load(source + index, mask=index < cols, other=0.0).to(tl.float32) / scale
            value = tl.minimum(tl.maximum(value, -448.0), 448.0)
            tl.store(out_ptr + row * cols + index, value.to(out_ptr.dtype.element_ty), mask=index < cols)

    @triton.jit
    def nf4_to_fp8_transposed(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, inverse_ptr,
                              out_ptr, rows, cols, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr,
                              BLOCKSIZE2: tl.constexpr, ROWS: tl.constexpr, BYTES: tl.constexpr):
        # W^T [cols, rows] from a tile of W [rows, cols]: ROWS rows x 2 * BYTES columns, from the packed bytes (two
        # weights a byte, high nibble first, row-major: bitsandbytes' layout), absmax decoded as in nf4_triton
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        byte_col = tl.program_id(1) * BYTES + tl.arange(0, BYTES)
        half = cols // 2
        inside = (row[:, None] < rows) & (byte_col[None, :] < half)
        byte_index = row[:, None].to(tl.int64) * half + byte_col[None, :]
        byte = tl.load(packed_ptr + byte_index, mask=inside, other=0).to(tl.int32)
        block = (byte_index * 2) // BLOCKSIZE
        if NESTED:
            absmax_code = tl.load(absmax_ptr + block, mask=inside, other=0).to(tl.int32)
            scaled = tl.load(code2_ptr + absmax_code) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=inside,
                                                                  other=0.0)
            absmax = libdevice.add_rn(scaled, tl.load(offset_ptr))
        else:
            absmax = tl.load(absmax_ptr + block, mask=inside, other=0.0)
        high = tl.load(code_ptr + (byte >> 4)) * absmax
        low = tl.load(code_ptr + (byte & 15)) * absmax
        values = tl.interleave(high, low) * tl.load(inverse_ptr)
        values = tl.minimum(tl.maximum(values, -448.0), 448.0).to(out_ptr.dtype.element_ty)
        col = tl.program_id(1) * 2 * BYTES + tl.arange(0, 2 * BYTES)
        target = out_ptr + col[:, None].to(tl.int64) * rows + row[None, :]
        tl.store(target, tl.trans(values), mask=(col[:, None] < cols) & (row[None, :] < rows))

    return rows_to_fp8, nf4_to_fp8_transposed


def rows_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D bf16 tensor (rows contiguous) as float8 and its fp32 scale per row, [rows, 1]: x ~ out * scale."""
    rows, cols = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty((rows, cols), dtype=FP8, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        with on_device(x):
            block = min(ROW_BLOCK, 1 << (cols - 1).bit_length())
            fp8_kernels()[0][(rows,)](x, out, scale, cols, x.stride(0), BLOCK=block, num_warps=4)
    return out, scale


class Fp8Weight:
    """What a frozen NF4 weight keeps for its float8 matmuls: the tensor's scale (its largest magnitude / 448, from
    one fp32 dequantize at first use: the weight never changes) and that scale spread over each side, as the rowwise
    matmul reads it."""

    def __init__(self, layer) -> None:
        packed, state = layer.weight.data, layer.weight.quant_state
        dense = nf4_dequantize(packed, state, out=torch.empty(state.shape, dtype=torch.float32, device=packed.device))
        largest = dense.abs_().amax()
        del dense
        largest = torch.clamp(largest, min=1e-30).reshape(1)
        self.scale, self.inverse = largest / FP8_MAX, FP8_MAX / largest
        self.per_out = self.scale.expand(1, layer.out_features).contiguous()
        self.per_in = self.scale.expand(1, layer.in_features).contiguous()


def fp8_weight(layer) -> Fp8Weight:
    cached = getattr(layer, "_qlora_kit_fp8", None)
    if cached is None:
        cached = layer._qlora_kit_fp8 = Fp8Weight(layer)
    return cached


def nf4_to_fp8(layer, inverse: torch.Tensor, transpose: bool) -> torch.Tensor:
    """The layer's NF4 weight times `inverse` (a 1-element fp32 tensor) in float8: [out, in], or [in, out] with
    `transpose`. Each value is bitsandbytes' fp32 product code * absmax, times `inverse`, rounded once. [out, in]
    comes from nf4_triton's kernel (flat, the fastest layout); the transposed copy from 2-D tiles here."""
    packed, state = layer.weight.data, layer.weight.quant_state
    if not transpose:
        return nf4_dequantize(packed, state, fp8_inverse=inverse)
    rows, cols = state.shape
    out = torch.empty((cols, rows), dtype=FP8, device=packed.device)
    pointers, constants = quant_state_arguments(state)
    grid = (-(-rows // TILE_ROWS), -(-(cols // 2) // TILE_BYTES))
    with on_device(packed):
        fp8_kernels()[1][grid](packed, *pointers, inverse, out, rows, cols, ROWS=TILE_ROWS, BYTES=TILE_BYTES,
                               num_warps=8, **constants)
    return out


# q, k and v (gate and up) read the same input: it is cast once. The cast is kept for the tensor object it was made
# from (a weak reference, so it never outlives it and a new tensor at the same address cannot match) at its version.
_last_input: list = [None]


def input_in_fp8(x2d: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    last = _last_input[0]
    if last is not None and last[0]() is source and last[1] == source._version and last[2] == x2d.shape:
        return last[3], last[4]
    xq, scale = rows_to_fp8(x2d)
    _last_input[0] = (weakref.ref(source), source._version, x2d.shape, xq, scale)
    return xq, scale


def fp8_linear(x2d: torch.Tensor, layer, source: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T in bf16 through float8: x2d [tokens, in] bf16; `source` the tensor x2d was viewed from, when the cast
    may be shared with the next layer reading it."""
    weight = fp8_weight(layer)
    xq, x_scale = input_in_fp8(x2d, source) if source is not None else rows_to_fp8(x2d)
    wq = nf4_to_fp8(layer, weight.inverse, transpose=False)
    return torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=weight.per_out, out_dtype=torch.bfloat16)


def fp8_grad_input(g2d: torch.Tensor, layer) -> torch.Tensor:
    """dY W in bf16 through float8: g2d [tokens, out] bf16."""
    weight = fp8_weight(layer)
    gq, g_scale = rows_to_fp8(g2d)
    wq_t = nf4_to_fp8(layer, weight.inverse, transpose=True)
    return torch._scaled_mm(gq, wq_t.t(), scale_a=g_scale, scale_b=weight.per_in, out_dtype=torch.bfloat16)
