"""Host (Python + launch) time and GPU time of one 8B-shape decoder layer's training forward + backward, per piece.

The 8B step at batch 2 is host-bound on some GPU machines (its GPU kernels take less time than the step), so the
per-call host cost of each piece decides speed there. Host time is measured at 16 tokens, where the GPU work is
negligible and the wall time of a synchronised call is what Python and the launches cost; GPU time at the real batch
(2 x 2048 tokens) with CUDA events.

  python scripts/layer_host_time.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import SHAPES, gpu_ms  # noqa: E402  (scripts/ is not a package)


def build_layer(folder: Path, liger: bool):
    """One Llama-3-8B decoder layer in NF4 with LoRA r=16 on every linear, the way qlora-kit trains it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    if not (folder / "config.json").exists():
        shape = {key: SHAPES["8b"][key] for key in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                      "num_key_value_heads", "rope_theta")}
        config = LlamaConfig(**shape, num_hidden_layers=1, vocab_size=256)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()
            if "lora_B" in name:
                param.data.normal_(0, 0.02)
    if liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model.get_base_model())
    return model


def layer_step(model, tokens: int):
    base = model.get_base_model().model
    layer = base.layers[0]
    x = torch.randn(1, tokens, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(tokens, device="cuda")[None]
    cos_sin = base.rotary_emb(x, positions)
    grad = torch.randn_like(x)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x, position_embeddings=cos_sin, attention_mask=None, position_ids=positions)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)

    return step


def host_ms(step, repeats: int = 30) -> float:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def kernel_table(step, rows: int = 25) -> str:
    """CUDA time by op of two forward + backward calls (after warm-up), heaviest first."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70)


def piece_host_us(fn, repeats: int = 200) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * host / repeats


def pieces(model) -> dict[str, float]:
    """Host microseconds per call of the pieces the fused layers call, at 16 tokens (enqueue only)."""
    import bitsandbytes as bnb

    from qlora_kit.speed.lora_autograd import dequantized_weight, liger_gate_kernels

    down = model.get_base_model().model.layers[0].mlp.down_proj.get_base_layer()
    x = torch.randn(16, 14336, device="cuda", dtype=torch.bfloat16)
    w = down.weight
    gate, up = torch.randn(16, 14336, device="cuda", dtype=torch.bfloat16), torch.randn_like(x)
    out = {
        "bnb.matmul_4bit": piece_host_us(lambda: bnb.matmul_4bit(x, w.t(), quant_state=w.quant_state)),
        "dequantize_4bit + mm": piece_host_us(lambda: torch.mm(x, dequantized_weight(down, torch.bfloat16).t())),
        "dequantize_4bit": piece_host_us(lambda: dequantized_weight(down, torch.bfloat16)),
        "torch.mm": piece_host_us(lambda: torch.mm(gate, x.t())),
        "torch silu*mul": piece_host_us(lambda: torch.nn.functional.silu(gate.float()).to(up.dtype) * up),
    }
    if liger_gate_kernels("silu") is not None:
        forward, backward = liger_gate_kernels("silu")
        out["liger swiglu_forward"] = piece_host_us(lambda: forward(gate, up))
        out["liger swiglu_backward"] = piece_host_us(lambda: backward(gate, up, x))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/layer_host_time")
    parser.add_argument("--work", default="/tmp/layer_host_time_model")
    parser.add_argument("--kernels", action="store_true", help="also write a CUDA-time table per variant")
    args = parser.parse_args()
    import qlora_kit.speed.lora_autograd as lora_autograd
    from qlora_kit.speed.patches import use_fused_lora, use_fused_mlp

    results = {}
    cached_casts, fp32_grads = lora_autograd.in_compute_dtype, lora_autograd.matmul_into
    for name, liger, fused, mlp in [("peft", True, False, False), ("fused_lora", True, True, False),
                                    ("fused_lora+fused_mlp", True, True, True),
                                    ("fused_lora+fused_mlp, adapter cast in every call", True, True, True),
                                    ("fused_lora+fused_mlp, adapter grads cast after the matmul", True, True, True)]:
        lora_autograd.in_compute_dtype = (cached_casts if "every call" not in name else
                                            lambda weight, dtype, cast_once=True: weight.to(dtype))
        lora_autograd.matmul_into = (fp32_grads if "cast after" not in name else
                                       lambda a, b, dtype: torch.mm(a, b).to(dtype))
        model = build_layer(Path(args.work), liger)
        model.train()
        if fused:
            use_fused_lora(model)
        if mlp:
            use_fused_mlp(model)
        results[name] = {"host_ms_16_tokens": host_ms(layer_step(model, 16)),
                         "gpu_ms_4096_tokens": gpu_ms(layer_step(model, 4096))}
        print(name, results[name], flush=True)
        if args.kernels:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            slug = re.sub(r"[^a-z0-9]+", "_", name)
            (Path(args.out) / f"kernels_{slug}.txt").write_text(kernel_table(layer_step(model, 4096)))
        if name == "fused_lora+fused_mlp":
            results["pieces_host_us"] = pieces(model)
            print(results["pieces_host_us"], flush=True)
        del model
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "layer_host_time.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
