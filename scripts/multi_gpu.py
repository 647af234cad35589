"""Multi-GPU proof through `accelerate launch`: DDP and FSDP-QLoRA against one GPU, same recipe, same global batch.

One command on a 2-GPU machine (device kind nvidia-h100-x2 / nvidia-h200-x2). It reuses bench_common.py's
random-weight model of a real shape and its exactly-`seq`-token chat rows, then runs qlora-kit's real CLI three ways:

  single  `python -m qlora_kit train R training.batch_size=B training.gradient_accumulation_steps=2`  (1 GPU)
  ddp     `accelerate launch --config_file recipes/accelerate/ddp.yaml train.py R training.batch_size=B`
  fsdp    `accelerate launch --config_file recipes/accelerate/fsdp_qlora.yaml train.py R training.batch_size=B
           quantization.quant_storage=bf16`

so every optimizer step sees the same 2B rows in the same order. It reports each run's loss per step, the largest
relative loss difference to the single-GPU run (after step 1), global train tokens/s (qlora-kit's own
`train_tokens_per_second`, which counts the tokens of every rank), the scaling factor against one GPU, and rank 0's
peak memory. JSON + markdown go to --out after every run, so a cut-off call still returns what finished.

  python scripts/multi_gpu.py --out $OUT                            # 1B shape, seq 2048, batch 4 per GPU
  python scripts/multi_gpu.py --out $OUT --shape 8b --batch 2 --modes fsdp
  python scripts/multi_gpu.py --out $OUT --fit 70b          # does FSDP-QLoRA of the 70B shape fit on the GPUs?

--fit builds a *sparse* checkpoint of the shape: every linear layer of the decoder is a hole in the safetensors file
(reads as zeros, takes no disk), the embeddings and lm_head are random and the norms ones. 140 GB of bf16 weights then
need ~4 GB of disk, and GPU memory is what a real checkpoint needs (4-bit blocks, LoRA, activations, optimizer); the
loss is not meaningful there (the decoder layers pass the residual stream through unchanged), only the fit is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402  (scripts/ is not a package)
from bench_common import ROOT, SHAPES, fmt  # noqa: E402

MODES = ("single", "ddp", "fsdp")
LOSS_TOLERANCE = {"ddp": 0.01, "fsdp": 0.02}  # relative, per step; FSDP keeps LoRA weights in bf16 (no fp32 masters)


def launch_command(mode: str, recipe: Path, batch: int, gpus: int) -> list[str]:
    overrides = [f"training.batch_size={batch}"]
    if mode == "single":
        return [sys.executable, "-m", "qlora_kit", "train", str(recipe), *overrides,
                f"training.gradient_accumulation_steps={gpus}"]
    config = ROOT / "recipes" / "accelerate" / ("ddp.yaml" if mode == "ddp" else "fsdp_qlora.yaml")
    extra = ["quantization.quant_storage=bf16"] if mode == "fsdp" else []
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", str(gpus), str(ROOT / "train.py"), str(recipe), *overrides, *extra]


def run_mode(mode: str, recipe: dict[str, Any], work: Path, batch: int, gpus: int, timeout: float) -> dict[str, Any]:
    import yaml

    recipe = {**recipe, "training": {**recipe["training"], "run_name": f"multi_{mode}"}}
    recipe_path = work / f"recipe_multi_{mode}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_dir = Path(recipe["training"]["output_dir"]) / f"multi_{mode}"
    env_command = launch_command(mode, recipe_path, batch, gpus)
    status, _, tail, seconds = common.run_logged(env_command, timeout, mode)
    record: dict[str, Any] = {"mode": mode, "command": " ".join(env_command), "wall_s": round(seconds, 1),
                              "gpus": 1 if mode == "single" else gpus}
    summary_path = run_dir / "summary.json"
    if status != 0 or not summary_path.is_file():
        return {**record, "error": common.error_summary(status, tail), "log_tail": tail[-25:]}
    adapter = run_dir / "adapter" / "adapter_model.safetensors"
    return {**record, **common.run_measurements(run_dir), "error": None,
            "adapter_bytes": adapter.stat().st_size if adapter.is_file() else None}


def compare_to_single(runs: list[dict[str, Any]]) -> None:
    single = next((r for r in runs if r["mode"] == "single" and not r.get("error")), None)
    for run in runs:
        if single is None or run.get("error") or run["mode"] == "single":
            continue
        pairs = list(zip(single["losses"], run["losses"], strict=False))[1:]
        run["max_relative_loss_diff"] = max(abs(a - b) / abs(a) for a, b in pairs) if pairs else None
        run["loss_within_tolerance"] = (run["max_relative_loss_diff"] is not None
                                        and run["max_relative_loss_diff"] <= LOSS_TOLERANCE[run["mode"]])
        run["scaling_vs_single"] = run["tokens_per_second"] / single["tokens_per_second"]
        run["memory_vs_single"] = run["peak_gpu_memory_gib"] / single["peak_gpu_memory_gib"]


def markdown(results: dict[str, Any]) -> str:
    env, s = results["env"], results["settings"]
    lines = [f"# qlora-kit on {s['gpus']} GPUs through accelerate: DDP and FSDP-QLoRA vs one GPU ({results['date']})",
             "", f"GPU: {s['gpus']}x {env.get('gpu')} ({env.get('gpu_memory_gib', '?')} GiB); "
             f"torch {env.get('torch')}, "
             f"transformers {env.get('transformers')}, accelerate {env.get('accelerate')}, bitsandbytes "
             f"{env.get('bitsandbytes')}, peft {env.get('peft')}, trl {env.get('trl')}.", "",
             f"{s['label']} shape (random weights), seq {s['seq']}, NF4 + double quant, bf16, LoRA r=16 all-linear, "
             f"paged AdamW 8-bit, {s['steps']} steps, global batch {s['batch'] * s['gpus']} rows per step "
             f"(one GPU: batch {s['batch']} x {s['gpus']} accumulation steps; DDP/FSDP: batch {s['batch']} per GPU). "
             "tokens/s are global (all ranks); peak memory is rank 0's.", "",
             "| mode | GPUs | tokens/s | scaling vs 1 GPU | peak GiB (rank 0) | max rel. loss diff vs 1 GPU | "
             "within tolerance | loss per step |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["runs"]:
        losses = f"**failed:** {r['error']}" if r.get("error") else " ".join(f"{x:.4f}" for x in r["losses"])
        tol = r.get("loss_within_tolerance")
        lines.append("| " + " | ".join([
            r["mode"], str(r["gpus"]), fmt(r.get("tokens_per_second"), ",.0f"), fmt(r.get("scaling_vs_single"), ".2f"),
            fmt(r.get("peak_gpu_memory_gib"), ".2f"), fmt(r.get("max_relative_loss_diff"), ".2e"),
            "—" if tol is None else f"{'yes' if tol else 'NO'} (≤ {LOSS_TOLERANCE[r['mode']]:.0%})", losses]) + " |")
    lines += ["", f"Total wall time: {results.get('wall_s', '?')} s", ""]
    return "\n".join(lines)


def write_outputs(results: dict[str, Any], out: Path) -> None:
    compare_to_single(results["runs"])
    (out / "multi_gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "multi_gpu.md").write_text(markdown(results))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1b", choices=list(SHAPES))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4, help="micro-batch per GPU")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default="multi_gpu_out")
    parser.add_argument("--work", default="/tmp/qlora_multi")
    parser.add_argument("--run-timeout", type=float, default=400)
    parser.add_argument("--fit", default=None, choices=list(SHAPES),
                        help="instead: FSDP-QLoRA of this shape from a sparse checkpoint, batch 1, --steps steps")
    parser.add_argument("--deadline", type=float, default=None, help="stop starting runs after this many seconds")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",")]
    if unknown := [m for m in modes if m not in MODES]:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")

    start = time.perf_counter()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    env = common.read_environment()
    data = common.chat_data(work, args.seq, args.steps * args.batch * args.gpus + 8)
    if args.fit:
        args.shape, args.batch, modes = args.fit, 1, ["fsdp"]
        model = work / "models" / f"{args.fit}_sparse"
        build = common.build_sparse_model(args.fit, model, work / "tokenizer")
        print(f"sparse {args.fit} checkpoint: {build}", flush=True)
    else:
        model, build = common.ensure_model(args.shape, work, args.run_timeout, args.seq)
    common.check_model_tokenizer(model, Path(data["path"]))
    recipe = common.qlora_kit_recipe(model, Path(data["path"]), work, args.shape, args.seq, args.batch, args.steps,
                              env["has_gpu"])
    settings = {"shape": args.shape, "label": SHAPES[args.shape]["label"], "seq": args.seq,
                "batch": args.batch, "gpus": args.gpus, "steps": args.steps, "fit": bool(args.fit)}
    results: dict[str, Any] = {"date": env["date"], "env": env, "code": common.code_version(), "settings": settings,
                               "model": build, "runs": []}
    for mode in modes:
        left = args.deadline - (time.perf_counter() - start) if args.deadline else args.run_timeout
        if left < 30:
            results["runs"].append({"mode": mode, "gpus": args.gpus, "error": "skipped: --deadline reached"})
        else:
            results["runs"].append(run_mode(mode, recipe, work, args.batch, args.gpus, min(left, args.run_timeout)))
        results["wall_s"] = round(time.perf_counter() - start, 1)
        write_outputs(results, out)
    print("\n" + markdown(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
