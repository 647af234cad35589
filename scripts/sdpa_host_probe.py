"""Why cuDNN's attention costs milliseconds of host time a call inside a Qwen2.5 run but not in a bare call.

Every call of torch's scaled_dot_product_attention is wrapped: its host time (no synchronisation, so the time the
Python thread spends in the call) and what it was given (sizes, strides, storage offsets, mask, enable_gqa, grad
mode). Run first as bare calls (the speed plan's probe), then inside `qlora-kit train` on a few-layer model of the
shape. cuDNN frontend's own log (CUDNN_FRONTEND_LOG_INFO) counts the graphs it builds: a build per call means the
graph cache misses.

  python scripts/sdpa_host_probe.py --shape qwen2.5-7b --shape 8b --out $OUT
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def wrap_sdpa(records: list):
    import torch

    original = torch.nn.functional.scaled_dot_product_attention

    def traced(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        start = time.perf_counter()
        out = original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                       enable_gqa=enable_gqa)
        host = time.perf_counter() - start
        meta = (tuple(query.shape), query.stride(), key.stride(), value.stride(), query.storage_offset(),
                key.storage_offset(), value.storage_offset(), query.dtype, attn_mask is None, bool(is_causal),
                bool(enable_gqa), float(dropout_p), scale, torch.is_grad_enabled(), query.requires_grad,
                query.data_ptr() % 256, key.data_ptr() % 256)
        records.append((meta, host))
        return out

    torch.nn.functional.scaled_dot_product_attention = traced
    return original


def summary(records: list, skip: int) -> dict:
    groups = collections.defaultdict(list)
    for meta, host in records[skip:]:
        groups[meta].append(host)
    return {"calls": len(records) - skip, "distinct_arguments": len(groups),
            "groups": [{"arguments": repr(meta), "calls": len(hosts), "host_us_median": round(statistics.median(hosts)
                                                                                            * 1e6, 1),
                        "host_us_max": round(max(hosts) * 1e6, 1)} for meta, hosts in groups.items()]}


def bare_calls(shape_name: str, batch: int, tokens: int) -> dict:
    import torch
    from bench_common import SHAPES
    from torch.nn.attention import SDPBackend, sdpa_kernel

    spec = SHAPES[shape_name]
    heads, kv, hidden = spec["num_attention_heads"], spec["num_key_value_heads"], spec["hidden_size"]
    head_dim = spec.get("head_dim", hidden // heads)
    x = torch.randn(batch, tokens, hidden, device="cuda", dtype=torch.bfloat16)
    weights = [(torch.randn(h * head_dim, hidden, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
               for h in (heads, kv, kv)]
    results = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        for gqa in (True, False):
            records: list = []
            original = wrap_sdpa(records)
            try:
                with sdpa_kernel([backend]):
                    for _ in range(8):
                        q, k, v = (torch.nn.functional.linear(x, w).view(batch, tokens, -1, head_dim).transpose(1, 2)
                                   for w in weights)
                        if not gqa:
                            k, v = (t.repeat_interleave(heads // kv, dim=1) for t in (k, v))
                        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                               enable_gqa=gqa and heads != kv)
                        out.sum().backward()
                    torch.cuda.synchronize()
                results[f"{name} gqa={gqa}"] = summary(records, 2)
            except RuntimeError as exc:
                results[f"{name} gqa={gqa}"] = f"cannot run: {exc!s:.120}"
            finally:
                torch.nn.functional.scaled_dot_product_attention = original
    return results


def in_training(shape_name: str, work: Path, layers: int, steps: int, overrides: list[str],
                ragged: bool = False) -> dict:
    """qlora-kit train on a `layers`-layer model of the shape, every sdpa call traced; the profiler's self CPU time
    of cuDNN's forward/backward ops over the last steps. `ragged`: rows of varied lengths (padded batches)."""
    import torch
    import yaml
    from bench_common import chat_data, qlora_kit_recipe, shape_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = chat_data(work, 2048, 64, ragged)  # ragged: 1,024..2,048 tokens a row (bench_common.write_dataset)
    folder = work / f"{shape_name}_{layers}layers"
    if not (folder / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
        config, _ = shape_config(shape_name, tokenizer, num_hidden_layers=layers)
        cuda = torch.cuda.is_available()
        with torch.device("cuda" if cuda else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
    recipe = qlora_kit_recipe(folder, Path(data["path"]), work, shape_name, 2048, 2, steps, torch.cuda.is_available())
    recipe["speed"] = {}
    recipe["training"]["optimizer"] = "auto"
    recipe["training"]["run_name"] = f"probe_{shape_name}_{len(list(work.glob('probe_*.yaml')))}"
    recipe_path = work / f"{recipe['training']['run_name']}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))

    from transformers import TrainerCallback

    import qlora_kit.pipeline
    from qlora_kit.pipeline import run_training
    from qlora_kit.recipe import load_recipe

    records: list = []
    marks: dict = {}
    profiles: dict = {}

    class Marks(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            marks[state.global_step] = len(records)
            if state.global_step == steps - 2:
                profiles["p"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                profiles["p"].start()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == steps and "p" in profiles:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                profiles["p"].stop()

    build_trainer = qlora_kit.pipeline.build_trainer

    def traced_trainer(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        trainer.add_callback(Marks())
        return trainer

    qlora_kit.pipeline.build_trainer = traced_trainer
    original = wrap_sdpa(records)
    try:
        run_training(load_recipe(str(recipe_path), overrides))
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
        qlora_kit.pipeline.build_trainer = build_trainer
    ops = {}
    if "p" in profiles:
        for event in profiles["p"].key_averages():
            if "attention" in event.key:
                ops[event.key] = {"calls": event.count, "self_cpu_us_per_call": round(event.self_cpu_time_total
                                                                                        / max(event.count, 1), 1)}
    return {"overrides": overrides, "sdpa_from_step_2": summary(records, marks.get(2, 0)), "profiler_ops": ops,
            "cudnn_sdp_enabled_after": torch.backends.cuda.cudnn_sdp_enabled()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--work", default="/tmp/sdpa_probe")
    parser.add_argument("--out", default="sdpa_probe_out")
    parser.add_argument("--variant", action="append", default=[],
                        help="comma-separated overrides for one more in-training run per shape")
    parser.add_argument("--ragged", action="store_true", help="also train on rows of varied lengths (padded batches)")
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = {}
    for shape in args.shape:
        results[shape] = {"bare": bare_calls(shape, 2, 2048)}
        for variant in ["", *args.variant]:
            overrides = [o for o in variant.split(",") if o]
            for ragged in (False, True) if args.ragged else (False,):
                results[shape][f"train {'ragged ' if ragged else ''}{variant or 'defaults'}"] = in_training(
                    shape, work, args.layers, args.steps, overrides, ragged)
        (out / "sdpa_host_probe.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
