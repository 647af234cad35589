"""speed.compile_layers on a GPU: one bf16 step of compiled decoder layers against the same layers eager.

For a bench shape shrunk to test size (bench_common.SHAPES, the family's own config class), builds the model in NF4
with r=8 LoRA on every linear (B non-zero), one layer checkpointed and one keeping its activations, and prints per
row shape the loss and the largest relative LoRA-gradient error of the compiled layers (as qlora-kit runs them: peft's
LoRA ops inside the graph) against eager ones, peft's and qlora-kit's fused LoRA layers, a JSON line each. It found
the fused LoRA functions going wrong inside compiled graphs on CUDA at some row shapes (2026-12-01, scripts/
bench_results/h200_2026-12-01_compile_swiglu/); the bf16 floor is ~0.015-0.04 there:

  source scripts/device_prelude.sh; python3 scripts/compiled_layer_check.py --shape tiny-gemma-3 --rows 3x128,4x128
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_common import SHAPES, attention, shape_config  # noqa: E402

from qlora_kit.model import build_quantized_model  # noqa: E402
from qlora_kit.recipe import load_recipe  # noqa: E402
from qlora_kit.speed.patches import (  # noqa: E402
    compile_decoder_layers,
    keep_activations,
    keep_adapter_weights_in_fp32,
    use_fused_lora,
)


def build(folder: Path, shape: str, upcast: bool):
    data = folder / "rows.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b"}]}) + "\n")
    recipe_file = folder / "check.yaml"
    recipe_file.write_text(json.dumps({
        "model": {"name": str(folder / "model"), "attn_implementation": attention(shape)},
        "quantization": {"load_in_4bit": True, "compute_dtype": "bf16", "upcast_to_fp32": upcast},
        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
        "data": {"datasets": [{"path": str(data)}]},
        "training": {"output_dir": str(folder / "out"), "max_length": 64},
        "evaluation": {"metric": "none"}}))
    torch.manual_seed(0)
    model = build_quantized_model(load_recipe(recipe_file), str(folder / "model"), torch.bfloat16)
    keep_adapter_weights_in_fp32(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a dry run of the script


def step(model, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def ids(rows: tuple[int, int]) -> torch.Tensor:
    return torch.randint(4, 500, rows, generator=torch.Generator().manual_seed(1)).to(DEVICE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny-gemma-3")
    parser.add_argument("--rows", default="3x128,4x128", help="ROWSxLENGTH,... one step each")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1184)
    parser.add_argument("--upcast", action="store_true", help="norms and embeddings in fp32")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    spec = SHAPES[args.shape]
    sizes = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=8,
                 num_key_value_heads=8 if spec["num_key_value_heads"] == spec["num_attention_heads"] else 4,
                 num_hidden_layers=2, vocab_size=512)
    if "head_dim" in spec:
        sizes["head_dim"] = 64
    config, _ = shape_config(args.shape, None, **sizes)
    batches = [tuple(int(v) for v in r.split("x")) for r in args.rows.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder / "model")
        for fused in (False, True):
            model = build(folder, args.shape, args.upcast).to(DEVICE)
            if fused:
                use_fused_lora(model)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            keep_activations(model, 1)
            model.train()
            eager = {b: step(model, ids(b)) for b in batches}
            torch._dynamo.reset()
            compile_decoder_layers(model)
            for b in batches:
                loss, grads = step(model, ids(b))
                ref_loss, ref = eager[b]
                errors = {n: ((grads[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in ref.items()}
                worst = max(errors, key=errors.get)
                print(json.dumps({"shape": args.shape, "eager_fused_lora": fused, "rows": b, "eager_loss": ref_loss,
                                  "compiled_loss": loss, "max_error": errors[worst], "worst": worst,
                                  "errors_over_0.05": sum(e > 0.05 for e in errors.values())}), flush=True)
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
