"""Merge a finished run in every dtype on both bases and print the merge check's numbers as a markdown table.

    python scripts/merge_check_table.py outputs/quickstart [--break double-scale|skip-layer] [--device cpu|cuda]

The merged models go to a temporary folder and are deleted; the run folder is only read. `--break` merges wrongly on
purpose (every LoRA scale doubled, or the first adapted layer left unmerged) to show the numbers a failing check sees.
Where docs/export.md's thresholds come from.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from qlora_kit import export

BREAKS = ("double-scale", "skip-layer")


def broken_merge_layer(kind: str):
    """export.merge_layer, wrong in one known way: what the check exists to catch."""
    original = export.merge_layer
    skipped: list[object] = []

    def merge_layer(module, dtype, device, weight=None):
        if kind == "double-scale":
            module.scaling = {name: 2 * s for name, s in module.scaling.items()}
        elif not skipped:
            skipped.append(module)
            layer = module.get_base_layer()
            layer.weight.data = (layer.weight.data if weight is None else weight).to(dtype)
            return
        original(module, dtype, device, weight)

    return merge_layer


def cell(a: dict | None) -> str:
    if a is None:
        return "n/a"
    if a["mean_kl"] is None:
        return f"{100 * a['top1_agreement']:.1f}% / not finite"
    return f"{100 * a['top1_agreement']:.1f}% / {a['mean_kl']:.2e} / {a['max_abs_logit_diff']:.3g}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--break", dest="broken", choices=BREAKS)
    parser.add_argument("--device", choices=("cpu", "cuda"))
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--bases", default="original,dequantized")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[qlora-kit] %(message)s")
    if args.broken:
        export.merge_layer = broken_merge_layer(args.broken)
    print("| dtype | base | vs trained 4-bit model | merge rounding | rounding budget (base alone) | 4-bit base "
          "| ratio max / KL | result |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            for base in args.bases.split(","):
                out = Path(tmp) / f"{dtype}-{base}"
                try:
                    export.merge_adapter(args.run_dir, out=out, dtype=dtype, base=base, device=args.device)
                    check, result = json.loads((out / "merge_check.json").read_text()), "passed"
                except export.MergeCheckFailed as exc:
                    check, result = asdict(exc.check), "failed"
                r, b, allowed, m = (check["merge_rounding"], check["rounding_budget"], check["allowed"],
                                    check["margin"])
                ratios = "n/a" if r["mean_kl"] is None else (  # over the budget (fp32: the floor), before the margin
                    f"{r['max_abs_logit_diff'] / (allowed['max_abs_logit_diff'] / m):.2f} / "
                    f"{r['mean_kl'] / (allowed['mean_kl'] / m**2):.2f}")
                print(f"| {dtype} | {base} | {cell(check['merged_vs_trained'])} | {cell(r)} | {cell(b)} | "
                      f"{cell(check['quantization'])} | {ratios} | {result} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
