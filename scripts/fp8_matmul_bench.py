"""The fused LoRA layers' big matmuls in bf16 against float8 (qlora_kit/speed/fp8.py), per weight shape of a model:
GPU time of forward (X W^T) and backward (dY W), each with the dequantize and casts it needs, the matmul alone, the
kernels' bits against torch's arithmetic, and the float8 result's error against an fp32 reference beside bf16's.

  python scripts/fp8_matmul_bench.py --out $OUT                     # 8B shapes, 4,096 tokens
  python scripts/fp8_matmul_bench.py --shape qwen2.5-7b --shape mistral-7b --tokens 4096 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import SHAPES, gpu_ms, projection_shapes  # noqa: E402  (scripts/ is not a package)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference).norm() / reference.norm()).item()


def weight_layer(out_features: int, in_features: int):
    """A bitsandbytes NF4 Linear4bit (double-quantized absmax, bf16 compute) on the GPU, as the model factory makes."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4")
    layer.weight.data = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02  # a bf16 checkpoint's
    layer = layer.cuda()
    layer._triton_dequantize = True
    return layer


def measure(model: str, name: str, n_out: int, n_in: int, tokens: int) -> dict:
    """One weight shape: bits, errors and timings (see the module docstring)."""
    from qlora_kit.speed import fp8
    from qlora_kit.speed.lora_autograd import dequantized_weight
    from qlora_kit.speed.nf4_triton import nf4_dequantize

    layer = weight_layer(n_out, n_in)
    x = torch.randn(tokens, n_in, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(tokens, n_out, device="cuda", dtype=torch.bfloat16) * 1e-3
    weight = fp8.fp8_weight(layer)
    # bits: the kernels against the same arithmetic in torch ops
    w32 = nf4_dequantize(layer.weight.data, layer.weight.quant_state,
                         out=torch.empty((n_out, n_in), device="cuda", dtype=torch.float32))
    expected = (w32 * weight.inverse).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8)
    w_same = torch.equal(fp8.nf4_to_fp8(layer, weight.inverse, False).view(torch.uint8),
                         expected.view(torch.uint8))
    wt_same = torch.equal(fp8.nf4_to_fp8(layer, weight.inverse, True).view(torch.uint8),
                          expected.t().contiguous().view(torch.uint8))
    xq, x_scale = fp8.rows_to_fp8(x)
    largest = x.float().abs().amax(1, keepdim=True)
    x_expected = (x.float() / (largest / fp8.FP8_MAX)).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8)
    x_same = (xq.view(torch.uint8) == x_expected.view(torch.uint8)).float().mean().item()
    scale_error = ((x_scale - largest / fp8.FP8_MAX).abs() / largest).max().item()
    # error against fp32 products of the same bf16 operands
    w16 = dequantized_weight(layer, torch.bfloat16)
    forward32 = x.float() @ w16.float().t()
    backward32 = g.float() @ w16.float()
    row = dict(shape=model, weight=name, out=n_out, inp=n_in, weight_bits_equal=w_same,
               transposed_bits_equal=wt_same, row_cast_bits_equal_fraction=x_same,
               row_scale_max_relative_error=scale_error,
               forward_error_bf16=relative_error(torch.nn.functional.linear(x, w16), forward32),
               forward_error_fp8=relative_error(fp8.fp8_linear(x, layer), forward32),
               backward_error_bf16=relative_error(g @ w16, backward32),
               backward_error_fp8=relative_error(fp8.fp8_grad_input(g, layer), backward32))
    del w32, expected, w16, forward32, backward32
    wq = fp8.nf4_to_fp8(layer, weight.inverse, False)
    wq_t = fp8.nf4_to_fp8(layer, weight.inverse, True)
    gq, g_scale = fp8.rows_to_fp8(g)
    w16 = dequantized_weight(layer, torch.bfloat16)
    timings = {
        "forward_bf16": lambda: torch.nn.functional.linear(x, dequantized_weight(layer, torch.bfloat16)),
        "forward_fp8": lambda: fp8.fp8_linear(x, layer),
        "backward_bf16": lambda: g @ dequantized_weight(layer, torch.bfloat16),
        "backward_fp8": lambda: fp8.fp8_grad_input(g, layer),
        "matmul_bf16": lambda: torch.nn.functional.linear(x, w16),
        "matmul_fp8": lambda: torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=weight.per_out,
                                               out_dtype=torch.bfloat16),
        "grad_matmul_bf16": lambda: g @ w16,
        "grad_matmul_fp8": lambda: torch._scaled_mm(gq, wq_t.t(), scale_a=g_scale, scale_b=weight.per_in,
                                                    out_dtype=torch.bfloat16),
        "dequantize_bf16": lambda: dequantized_weight(layer, torch.bfloat16),
        "dequantize_fp8": lambda: fp8.nf4_to_fp8(layer, weight.inverse, False),
        "dequantize_fp8_transposed": lambda: fp8.nf4_to_fp8(layer, weight.inverse, True),
        "row_cast_x": lambda: fp8.rows_to_fp8(x),
    }
    for key, fn in timings.items():
        row[f"{key}_us"] = round(1000 * gpu_ms(fn, 20), 1)
    flops = 2 * tokens * n_out * n_in
    row["matmul_bf16_tflops"] = round(flops / row["matmul_bf16_us"] / 1e6, 1)
    row["matmul_fp8_tflops"] = round(flops / row["matmul_fp8_us"] / 1e6, 1)
    row["speedup_forward"] = round(row["forward_bf16_us"] / row["forward_fp8_us"], 3)
    row["speedup_backward"] = round(row["backward_bf16_us"] / row["backward_fp8_us"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/fp8_matmul_bench")
    parser.add_argument("--shape", action="append", choices=list(SHAPES), help="model shape (repeatable; default 8b)")
    parser.add_argument("--tokens", type=int, default=4096, help="rows of X (batch x sequence)")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens, "rows": []}
    for model in args.shape or ["8b"]:
        for name, (n_out, n_in) in projection_shapes(model).items():
            row = measure(model, name, n_out, n_in, args.tokens)
            print(json.dumps(row), flush=True)
            results["rows"].append(row)
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_matmul_bench.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["| shape | weight | fwd bf16 us | fwd fp8 us | x | bwd bf16 us | bwd fp8 us | x | mm TFLOP/s bf16 / fp8 | "
             "fwd err bf16 / fp8 | bwd err bf16 / fp8 | bits w / wT / x |", "|" + " --- |" * 12]
    for r in results["rows"]:
        lines.append(f"| {r['shape']} | {r['weight']} | {r['forward_bf16_us']} | {r['forward_fp8_us']} | "
                     f"{r['speedup_forward']} | {r['backward_bf16_us']} | {r['backward_fp8_us']} | "
                     f"{r['speedup_backward']} | {r['matmul_bf16_tflops']} / {r['matmul_fp8_tflops']} | "
                     f"{r['forward_error_bf16']:.2e} / {r['forward_error_fp8']:.2e} | "
                     f"{r['backward_error_bf16']:.2e} / {r['backward_error_fp8']:.2e} | "
                     f"{r['weight_bits_equal']} / {r['transposed_bits_equal']} / "
                     f"{r['row_cast_bits_equal_fraction']:.5f} |")
    (out / "fp8_matmul_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
