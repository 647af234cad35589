"""How the LoRA product should land on the frozen matmul's output, timed per 8B projection on the GPU.

The fused layers compute y = x W^T + s (x A^T) B^T (and in backward dx = g W + s (g B) A). Three ways to add the
rank-r term, each timed with CUDA events (median of --iters) at batch x seq tokens:

  add_after   y = x W^T, then y += s (xA^T) B^T in place (addmm_ with K = r: a full read-modify-write of y)
  beta_one    y = s (xA^T) B^T first (K = r: a full write of y), then y += x W^T (the big GEMM reads y with beta=1)
  k_concat    y = [x, s xA^T] [W, B]^T: one GEMM over K + r, after copying x into the wider input (the copy is
              timed; the weight's extra columns are assumed written by the dequantize, so not timed)

Each is checked against an fp32 reference. Writes JSON and a markdown table to --out.

    python scripts/adapter_add_bench.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import projection_shapes  # noqa: E402  (scripts/ is not a package)

SHAPES_8B = projection_shapes("8b")  # (out, in) of each Llama-3-8B projection


def timed(fn, iters: int) -> float:
    """Median microseconds of fn() over iters calls, after warm-up."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def forward_variants(x, w, a, b, s):
    """name -> callable returning y, for the forward y = x W^T + s (x A^T) B^T."""
    def add_after():
        y = torch.mm(x, w.t())
        return y.addmm_(torch.mm(x, a.t()), b.t(), alpha=s)

    def beta_one():
        return torch.mm(torch.mm(x, a.t()), b.t() * s).addmm_(x, w.t())

    wide_w = torch.cat([w, b * s], dim=1)  # what a dequantize writing into a wider buffer would give

    def k_concat():
        return torch.mm(torch.cat([x, torch.mm(x, a.t())], dim=1), wide_w.t())

    return {"add_after": add_after, "beta_one": beta_one, "k_concat": k_concat}


def backward_variants(g, w, a, b, s):
    """name -> callable returning dx, for the backward dx = g W + s (g B) A."""
    def add_after():
        return torch.mm(g, w).addmm_(torch.mm(g, b).mul_(s), a)

    def beta_one():
        return torch.mm(torch.mm(g, b).mul_(s), a).addmm_(g, w)

    tall_w = torch.cat([w, a], dim=0)

    def k_concat():
        return torch.mm(torch.cat([g, torch.mm(g, b).mul_(s)], dim=1), tall_w)

    return {"add_after": add_after, "beta_one": beta_one, "k_concat": k_concat}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="batch x seq; default 4096 (8B b2 s2048)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.manual_seed(0)
    dev, dt, s = "cuda", torch.bfloat16, 2.0
    rows = []
    for name, (n, k) in SHAPES_8B.items():
        x = torch.randn(args.tokens, k, device=dev, dtype=dt)
        g = torch.randn(args.tokens, n, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5
        a = torch.randn(args.rank, k, device=dev, dtype=dt) / k ** 0.5
        b = torch.randn(n, args.rank, device=dev, dtype=dt)
        ref_y = x.float() @ w.float().t() + s * (x.float() @ a.float().t()) @ b.float().t()
        ref_dx = g.float() @ w.float() + s * (g.float() @ b.float()) @ a.float()
        for direction, variants, ref in (("forward", forward_variants(x, w, a, b, s), ref_y),
                                         ("backward dx", backward_variants(g, w, a, b, s), ref_dx)):
            for variant, fn in variants.items():
                err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
                rows.append({"projection": name, "direction": direction, "variant": variant,
                             "us": round(timed(fn, args.iters), 1), "max_rel_err": float(f"{err:.2e}")})
                print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens,
              "rank": args.rank, "rows": rows}
    (args.out / "adapter_add.json").write_text(json.dumps(result, indent=1))
    lines = [f"GPU {result['gpu']}, torch {result['torch']}, {args.tokens} tokens, r={args.rank}; median us",
             "", "| projection | direction | add_after | beta_one | k_concat |", "| --- | --- | --- | --- | --- |"]
    for name in SHAPES_8B:
        for direction in ("forward", "backward dx"):
            cells = {r["variant"]: r["us"] for r in rows if r["projection"] == name and r["direction"] == direction}
            lines.append(f"| {name} | {direction} | {cells['add_after']} | {cells['beta_one']} | {cells['k_concat']} |")
    (args.out / "adapter_add.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
