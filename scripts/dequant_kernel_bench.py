"""GPU time of one NF4 dequantize per weight shape of a model (call to call, and kernels alone): bitsandbytes' API
against qlora-kit's Triton kernel (qlora_kit/speed/nf4_triton.py), and whether the two give the same bits.

  python scripts/dequant_kernel_bench.py --out $OUT
  python scripts/dequant_kernel_bench.py --shape qwen2.5-7b --shape 8b --out $OUT   # Qwen2.5's widths next to Llama's
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


def gpu_us(fn, repeats: int = 50) -> float:
    """Call-to-call GPU time (events around back-to-back calls: host-bound calls show their host time)."""
    return 1000 * gpu_ms(fn, repeats)


def kernel_us(fn, repeats: int = 20) -> float:
    """GPU kernel time per call (the profiler's device time, launch gaps excluded)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / repeats


def main() -> None:
    import bitsandbytes as bnb

    from qlora_kit.speed import nf4_triton
    from qlora_kit.speed.nf4_triton import nf4_dequantize

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/dequant_kernel_bench")
    parser.add_argument("--sweep", action="store_true", help="also time other program sizes and warp counts")
    parser.add_argument("--shape", action="append", choices=list(SHAPES),
                        help="model shape whose projections to time (repeatable; default 8b)")
    args = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "rows": []}
    weights = [(f"{model} {name}", shape) for model in args.shape or ["8b"]
               for name, shape in projection_shapes(model).items()]
    for name, shape in weights:
        weight = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        same = torch.equal(nf4_dequantize(packed, state), bnb.functional.dequantize_4bit(packed, state))
        bytes_moved = packed.numel() + state.absmax.numel() + 2 * weight.numel()
        row = {"weight": name, "shape": list(shape), "same_bits": same,
               "bitsandbytes_us": gpu_us(lambda p=packed, s=state: bnb.functional.dequantize_4bit(p, s)),
               "triton_us": gpu_us(lambda p=packed, s=state: nf4_dequantize(p, s))}
        row["bitsandbytes_kernel_us"] = kernel_us(lambda p=packed, s=state: bnb.functional.dequantize_4bit(p, s))
        row["triton_kernel_us"] = kernel_us(lambda p=packed, s=state: nf4_dequantize(p, s))
        row["bitsandbytes_kernel_tb_s"] = bytes_moved / row["bitsandbytes_kernel_us"] / 1e6
        row["triton_kernel_tb_s"] = bytes_moved / row["triton_kernel_us"] / 1e6
        if args.sweep:  # other program sizes and warp counts
            default = (nf4_triton.BYTES_PER_PROGRAM, nf4_triton.WARPS)
            for size, warps in ((512, 4), (1024, 4), (1024, 8), (2048, 4), (4096, 8), (8192, 8)):
                nf4_triton.BYTES_PER_PROGRAM, nf4_triton.WARPS = size, warps
                row[f"triton_kernel_us_{size}b_{warps}w"] = kernel_us(lambda p=packed, s=state: nf4_dequantize(p, s))
            nf4_triton.BYTES_PER_PROGRAM, nf4_triton.WARPS = default
        results["rows"].append(row)
        print(row, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "dequant_kernel_bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
