"""The GPU-memory table of recipes/README.md: each family recipe's peak training memory, estimated from the model's
published config alone (no weights, no network), at the recipe's own batch size and max_length.

    python scripts/recipe_memory_table.py          # rewrite the table between the markers in recipes/README.md

Each row is qlora_kit.memory.estimate_training_memory, what `qlora-kit data` prints: NF4 linears at ~0.52 byte/param,
the other weights in the compute dtype (fp32 with quantization.upcast_to_fp32), LoRA weights + grads in fp32 with
8-bit Adam states, checkpointed activations, the logits (none: trl's fused LM head computes the log-probs in tiles;
batch x max_length x vocabulary values at LOGIT_BYTES each only with SFT label smoothing) and ~1 GiB of CUDA context
and allocator slack (qlora_kit.memory.LOGIT_BYTES, CUDA_CONTEXT_GIB and ALLOCATOR_SLACK_GIB). Padding-free or short
rows need less; packing to full max_length rows is the worst case shown here.

LOGIT_BYTES is calibrated on two runs measured on an H100 with the same pipeline (random weights, real shapes, seq
2048, r=16 all-linear, gradient checkpointing, paged AdamW 8-bit; torch.cuda.max_memory_allocated):
  Llama-3-8B shape, batch 2: measured 11.35 GiB; estimate without logits 9.30 -> 2.05 GiB for 0.49 G logits = 4.2 B
  Llama-3.2-1B shape, batch 4: measured 4.62 GiB; estimate without logits 2.74 -> 1.88 GiB for 0.98 G logits = 1.9 B
4 bytes (one fp32 copy of the logits alive at the peak) fits the 8B run and over-estimates the 1B one by ~2 GiB.
With the speed defaults (H200, 2026-11-25) the 8B shape at batch 2 measured 7.33 GiB; the estimate says 8.3 with 1 GiB
of it CUDA context, which max_memory_allocated does not count.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "recipes" / "README.md"
START, END = "<!-- memory-table:start -->", "<!-- memory-table:end -->"

# The config.json values that decide memory, copied from each model's Hub repo (model_type, then sizes).
REAL_CONFIGS: dict[str, tuple[str, str, dict]] = {
    "llama-3.1-8b.yaml": ("Llama 3.1 8B Instruct", "llama", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)),
    "mistral-7b.yaml": ("Mistral 7B Instruct v0.3", "mistral", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32768, tie_word_embeddings=False)),
    "qwen2.5-7b.yaml": ("Qwen2.5 7B Instruct", "qwen2", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)),
    "qwen3-8b.yaml": ("Qwen3 8B", "qwen3", dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False)),
    "gemma-2-9b.yaml": ("Gemma 2 9B it", "gemma2", dict(
        hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, vocab_size=256000, tie_word_embeddings=True)),
    "gemma-3-4b.yaml": ("Gemma 3 4B it (text + vision)", "gemma3", dict(
        text_config=dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=256, vocab_size=262208),
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=896, patch_size=14))),
    "phi-4-mini.yaml": ("Phi-4-mini-instruct", "phi3", dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=24,
        num_key_value_heads=8, vocab_size=200064, tie_word_embeddings=True, partial_rotary_factor=0.75)),
    "smollm2-1.7b.yaml": ("SmolLM2 1.7B Instruct", "llama", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True)),
}
GPUS_GIB = (8, 12, 16, 24, 40, 48, 80)


def estimate(recipe_file: str) -> dict[str, float]:
    """GiB per part for one recipe, with the model config written to a temp folder (the recipe's model.name is
    replaced by it, so no download happens)."""
    from transformers import AutoConfig

    from qlora_kit.memory import estimate_training_memory
    from qlora_kit.recipe import load_recipe

    _, model_type, sizes = REAL_CONFIGS[recipe_file]
    with tempfile.TemporaryDirectory() as folder:
        AutoConfig.for_model(model_type, **sizes).save_pretrained(folder)
        recipe = load_recipe(ROOT / "recipes" / recipe_file, [f"model.name={folder}"])
        parts = estimate_training_memory(recipe, folder)
    parts["batch_size"], parts["max_length"] = recipe.training.batch_size, recipe.training.max_length
    return parts


def smallest_gpu(total: float) -> str:
    fits = [g for g in GPUS_GIB if g >= total * 1.05]  # 5% headroom for fragmentation
    return f"{fits[0]} GB" if fits else f"> {GPUS_GIB[-1]} GB"


def memory_table() -> str:
    lines = ["| recipe | model | batch x length | 4-bit weights | other weights (bf16) | LoRA + optimizer | "
             "activations | logits | total | smallest GPU |", "|" + " --- |" * 10]
    for recipe_file, (label, _, _) in REAL_CONFIGS.items():
        p = estimate(recipe_file)
        lines.append(f"| [{recipe_file}]({recipe_file}) | {label} | {p['batch_size']} x {p['max_length']} | "
                     f"{p['quantized_weights']:.1f} | {p['other_weights']:.1f} | "
                     f"{p['lora_weights_grads_optimizer']:.2f} | {p['activations']:.1f} | {p['logits']:.1f} | "
                     f"**{p['total']:.1f}** | {smallest_gpu(p['total'])} |")
    return "\n".join(lines)


def updated_readme(text: str) -> str:
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    return pattern.sub(lambda _: f"{START}\n{memory_table()}\n{END}", text)


def main() -> None:
    README.write_text(updated_readme(README.read_text()))
    print(f"updated {README}", file=sys.stderr)


if __name__ == "__main__":
    main()
