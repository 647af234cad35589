"""Exports one merged model as GGUF in every quant type qlora-kit writes and prints what each check measured.

    python scripts/gguf_quant_table.py outputs/quickstart/merged      # a merged folder (RUN_DIR/merged)
    python scripts/gguf_quant_table.py --smollm2                      # SmolLM2-135M-Instruct + a random LoRA, merged

The numbers in docs/export.md come from the second form.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from qlora_kit.gguf import QUANT_TYPES, write_and_check


def smollm2_with_random_lora(folder: Path) -> Path:
    """The quickstart base with a rank-8 LoRA merged in whose B is random at the scale training leaves it (std 0.02;
    peft starts it at 0): a model that is not the base, and still answers like SmolLM2."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_kit.model import base_model_folder
    from qlora_kit.recipe import load_recipe

    base_folder = base_model_folder(load_recipe(Path(__file__).resolve().parents[1] / "recipes/quickstart.yaml").model)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    model.merge_and_unload().save_pretrained(folder)
    AutoTokenizer.from_pretrained(base_folder).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("merged", nargs="?", help="merged model folder")
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct with a random LoRA merged in")
    parser.add_argument("--quants", default=",".join(QUANT_TYPES), help="comma-separated quant types")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        merged = smollm2_with_random_lora(Path(tmp) / "merged") if args.smollm2 else Path(args.merged)
        print("| quant | size MiB | max abs logit diff vs same rounding (tolerance) | max abs logit diff vs merged "
              "| top-1 agreement | greedy tokens equal | seconds |")
        print("|---|---|---|---|---|---|---|")
        for quant in args.quants.split(","):
            path = Path(tmp) / f"model-{quant}.gguf"
            start = time.perf_counter()
            check = write_and_check(merged, path, quant)
            seconds = time.perf_counter() - start
            print(f"| {quant} | {path.stat().st_size / 2**20:.1f} | {check.max_abs_logit_diff_vs_rounded:.2g} "
                  f"({check.tolerance:.2g}) | {check.max_abs_logit_diff_vs_merged:.3g} | "
                  f"{100 * check.top1_agreement_vs_merged:.1f}% | {check.greedy_tokens_equal} | {seconds:.0f} |",
                  flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
