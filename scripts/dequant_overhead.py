"""Host time per 4-bit dequantization: bitsandbytes' public function against speed.dequantized_weight's direct calls.

The 8B step dequantizes 1,344 times; when the host, not the GPU, sets the pace of a step, what matters is how long one
call keeps the CPU busy. Small weights make the GPU work negligible, so the time per call is the host's; the Llama-3-8B
MLP shape shows where the GPU's own time takes over. GPU only; writes dequant_overhead.json and .md to --out.

  python scripts/dequant_overhead.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SHAPES = [(256, 256), (1024, 4096), (4096, 4096), (14336, 4096)]  # small ones: host-bound; last: an 8B MLP weight
CALLS = 2000


def quantized_layer(out_features: int, in_features: int):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features, dtype=torch.bfloat16), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
    return layer.cuda()


def microseconds_per_call(dequantize, layer) -> float:
    for _ in range(50):
        dequantize(layer)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(CALLS):
        dequantize(layer)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / CALLS * 1e6


def main() -> None:
    import bitsandbytes as bnb

    from qlora_kit.speed import dequantized_weight

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "bitsandbytes.functional.dequantize_4bit": lambda layer: bnb.functional.dequantize_4bit(
            layer.weight.data, layer.weight.quant_state).to(torch.bfloat16),
        "qlora_kit.speed.dequantized_weight": lambda layer: dequantized_weight(layer, torch.bfloat16),
    }
    rows = []
    for shape in SHAPES:
        layer = quantized_layer(*shape)
        rows.append({"shape": list(shape), **{name: round(microseconds_per_call(fn, layer), 1)
                                               for name, fn in paths.items()}})
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "bitsandbytes": bnb.__version__,
              "calls_per_shape": CALLS, "microseconds_per_call": rows}
    (out / "dequant_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Host time per dequantization, µs per call ({result['gpu']}, bitsandbytes {bnb.__version__}, "
             f"{CALLS} calls each)", "", "| weight [out, in] | " + " | ".join(paths) + " |",
             "| --- |" + " --- |" * len(paths)]
    lines += [f"| {row['shape']} | " + " | ".join(str(row[name]) for name in paths) + " |" for row in rows]
    (out / "dequant_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
