"""`qlora-kit` subcommands. Argument parsing, and the pipeline read top to bottom in `run_training`."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from qlora_kit.recipe import QloraKitError, Recipe, load_recipe

log = logging.getLogger("qlora_kit")


def run_training(recipe: Recipe) -> dict:
    """load recipe -> build data -> build model -> (score before) -> train -> save adapter -> (score after) -> merge."""
    from accelerate import PartialState

    from qlora_kit.train import prepare_run_dir

    state = PartialState()
    run_dir = prepare_run_dir(recipe, state.is_main_process)
    try:
        return train_in_run_dir(recipe, run_dir, state)
    except BaseException:
        if state.is_main_process:
            discard_if_nothing_saved(run_dir)
        raise


def discard_if_nothing_saved(run_dir: Path) -> None:
    """A run that failed before its first checkpoint leaves no folder for the next run to trip over."""
    if not any((run_dir / "checkpoints").glob("checkpoint-*")) and not (run_dir / "adapter").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        log.info("removed %s: the run failed before saving anything", run_dir)


def train_in_run_dir(recipe: Recipe, run_dir: Path, state) -> dict:
    from transformers import set_seed

    from qlora_kit.data import build_datasets
    from qlora_kit.evaluate import evaluate_generation, format_comparison
    from qlora_kit.export import merge_adapter
    from qlora_kit.model import (
        base_model_folder,
        build_quantized_model,
        check_model_config,
        end_of_turn_token_ids,
        load_tokenizer,
        resolve_dtype,
    )
    from qlora_kit.train import build_trainer, save_adapter, train_adapter, write_atomically

    with state.main_process_first():
        folder = base_model_folder(recipe.model)
    check_model_config(recipe, folder)
    tokenizer = load_tokenizer(recipe, folder)
    data = build_datasets(recipe, tokenizer)

    compute_dtype = resolve_dtype(recipe.quantization.compute_dtype, "quantization.compute_dtype")
    log.info("compute dtype: %s", str(compute_dtype).removeprefix("torch."))
    set_seed(recipe.training.seed)  # LoRA's random init must not depend on what ran before in this process
    model = build_quantized_model(recipe, folder, compute_dtype)
    stop_ids = end_of_turn_token_ids(tokenizer, model.generation_config.eos_token_id)

    score_generation = recipe.evaluation.metric != "none" and state.is_main_process
    if score_generation:
        with model.disable_adapter():
            before = evaluate_generation(model, tokenizer, data.eval_conversations, recipe.evaluation, stop_ids)
        log.info("before training: %s = %.1f%%", before.metric, 100 * before.score)

    trainer = build_trainer(recipe, model, tokenizer, data, run_dir, compute_dtype)
    summary = train_adapter(trainer, recipe, run_dir)
    save_adapter(trainer, tokenizer, run_dir, stop_ids)

    if score_generation:
        after = evaluate_generation(trainer.model, tokenizer, data.eval_conversations, recipe.evaluation, stop_ids)
        summary["generation"] = {"before": asdict(before), "after": asdict(after)}
        print(format_comparison(before, after), flush=True)
    state.wait_for_everyone()
    if state.is_main_process:
        write_atomically(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if recipe.export.merge:
            del trainer, model
            merge_adapter(run_dir)
        log.info("done: %s", run_dir)
    return summary


def cmd_validate(args: argparse.Namespace) -> None:
    from qlora_kit.data import load_rows

    recipe = load_recipe(args.recipe, args.overrides)
    rows = sum(len(load_rows(s, recipe.data.system_prompt)) for s in recipe.data.datasets)
    print(f"{args.recipe}: valid ({rows} training rows; run folder {recipe.run_dir})")


def cmd_data(args: argparse.Namespace) -> None:
    """Dry run of the data pipeline: tokenizer only, no model weights."""
    from qlora_kit.data import build_datasets, describe_data
    from qlora_kit.model import base_model_folder, estimate_training_memory, load_tokenizer

    recipe = load_recipe(args.recipe, args.overrides)
    folder = base_model_folder(recipe.model)
    tokenizer = load_tokenizer(recipe, folder)
    data = build_datasets(recipe, tokenizer)
    print(describe_data(data, tokenizer, recipe, color=sys.stdout.isatty()))
    memory = estimate_training_memory(recipe, folder)
    print(f"estimated peak GPU memory: {memory['total']:.1f} GiB (" + ", ".join(
        f"{k.replace('_', ' ')} {v:.2f}" for k, v in memory.items() if k != "total") + ")")


def cmd_train(args: argparse.Namespace) -> None:
    run_training(load_recipe(args.recipe, args.overrides))


def cmd_merge(args: argparse.Namespace) -> None:
    from qlora_kit.export import merge_adapter

    print(merge_adapter(args.run_dir, args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-kit", description="QLoRA fine-tuning from YAML recipes.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in [("validate", cmd_validate, "check a recipe and its data without loading weights"),
                             ("data", cmd_data, "dry run: rows, lengths, masks and a memory estimate, no weights"),
                             ("train", cmd_train, "fine-tune (same as `accelerate launch train.py RECIPE`)")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("recipe", help="recipe YAML file")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.learning_rate=1e-4 lora.r=32")
        p.set_defaults(func=func)
    p = sub.add_parser("merge", help="merge a run's adapter into a full-precision base")
    p.add_argument("run_dir", help="run folder, e.g. outputs/quickstart")
    p.add_argument("--out", help="where to write the merged model (default: RUN_DIR/merged)")
    p.set_defaults(func=cmd_merge)
    return parser


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[qlora-kit] %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = True  # so pytest (caplog) and host applications can still see the records


def main(argv: list[str] | None = None) -> int:
    from qlora_kit.train import TrainingInterrupted

    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        args.func(args)
    except TrainingInterrupted as exc:
        print(f"qlora-kit: {exc}", file=sys.stderr)
        return 130
    except QloraKitError as exc:
        print(f"qlora-kit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qlora-kit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

