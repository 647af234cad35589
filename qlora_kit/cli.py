"""`qlora-kit` subcommands: argument parsing only. Each command imports what it runs when it runs (torch, trl and
transformers cost seconds to import), so `validate` and `report` stay quick."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from qlora_kit.recipe import QloraKitError, load_recipe

log = logging.getLogger("qlora_kit")


def cmd_validate(args: argparse.Namespace) -> None:
    from qlora_kit.data import training_rows
    from qlora_kit.model import check_target_modules, local_config_folder
    from qlora_kit.publish import check_push_settings

    recipe = load_recipe(args.recipe, args.overrides)
    rows = training_rows(recipe)
    check_push_settings(recipe)
    folder = local_config_folder(recipe.model)
    layers = check_target_modules(recipe, folder) if folder else None
    print(f"{args.recipe}: valid ({rows} training rows; run folder {recipe.run_dir})")
    if layers is None:
        print("lora.target_modules: not checked, the model's config is not on this machine (training will check it)")
    else:
        print(f"lora.target_modules: found in the model (its linear layers: {', '.join(layers)})")


def cmd_data(args: argparse.Namespace) -> None:
    """Dry run of the data pipeline: tokenizer only, no model weights."""
    from qlora_kit.data import build_datasets, describe_data
    from qlora_kit.model import NOT_IN_TOTAL, base_model_folder, estimate_training_memory, load_tokenizer
    from qlora_kit.speed import long_context_settings

    recipe = load_recipe(args.recipe, args.overrides)
    folder = base_model_folder(recipe.model)
    tokenizer = load_tokenizer(recipe, folder)
    data = build_datasets(recipe, tokenizer)
    print(describe_data(data, tokenizer, recipe, color=sys.stdout.isatty()))
    memory = estimate_training_memory(recipe, folder)
    print(f"estimated peak GPU memory: {memory['total']:.1f} GiB (" + ", ".join(
        f"{k.replace('_', ' ')} {v:.2f}" for k, v in memory.items() if k not in ("total", *NOT_IN_TOTAL)) + ")")
    kept = recipe.speed.keep_activations_layers
    if memory["each_kept_layer"] and not (kept == "auto" and long_context_settings(recipe.speed)):
        print(f"speed.keep_activations_layers ({kept}): {memory['each_kept_layer']:.2f} GiB more per layer that keeps "
              "its activations" + (", as many as fit on the GPU when training starts" if kept == "auto" else ""))
    if memory["cpu_offloaded_checkpoints"]:
        print("host memory for the offloaded checkpoints (speed.offload_checkpoints): "
              f"{memory['cpu_offloaded_checkpoints']:.2f} GiB")


def cmd_train(args: argparse.Namespace) -> None:
    from qlora_kit.pipeline import run_training

    run_training(load_recipe(args.recipe, args.overrides))


def cmd_merge(args: argparse.Namespace) -> None:
    from qlora_kit.export import merge_adapter

    print(merge_adapter(args.run_dir, args.out))


def cmd_push(args: argparse.Namespace) -> None:
    from qlora_kit.publish import push_run

    print(push_run(args.run_dir, args.repo_id, merged=args.merged, private=args.private, base_model=args.base_model,
                   dry_run=args.dry_run, out=args.out))


def cmd_chat(args: argparse.Namespace) -> None:
    from qlora_kit.chat import chat_loop, chat_once
    from qlora_kit.evaluate import load_trained_model

    trained = load_trained_model(args.run_dir, merged=args.merged)
    if args.prompt is not None:
        chat_once(trained, args.prompt, args.system, args.max_new_tokens, args.temperature, out=sys.stdout)
    else:
        chat_loop(trained, args.system, args.max_new_tokens, args.temperature)


def cmd_eval(args: argparse.Namespace) -> None:
    from qlora_kit.evaluate import evaluate_run
    from qlora_kit.report import eval_note, eval_table, render_markdown, write_report

    report = evaluate_run(args.run_dir, args.data, args.max_samples, args.max_new_tokens, args.batch_size,
                          include_base=not args.no_base)
    print(render_markdown([("table", *eval_table(report)), ("p", eval_note(report))]), end="")
    if (Path(args.run_dir) / "report").is_dir():
        write_report(args.run_dir)  # the report shows eval.json; keep it current


def cmd_report(args: argparse.Namespace) -> None:
    from qlora_kit.report import write_report

    print(write_report(args.run_dir) / "report.md")


def add_after_training_commands(sub) -> None:
    """push / chat / eval / report: everything that reads a finished run folder."""
    p = sub.add_parser("push", help="upload a run's adapter (or merged model) with a model card to the Hub")
    p.add_argument("run_dir", help="run folder, e.g. outputs/quickstart")
    p.add_argument("--repo-id", required=True, help="Hub repo USER/NAME (or ORG/NAME); created if missing")
    p.add_argument("--merged", action="store_true", help="upload the merged model (merging first if needed)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--base-model", help="Hub id of the base model, for the card and adapter_config.json, when "
                                        "training used a local folder or GGUF")
    p.add_argument("--dry-run", action="store_true", help="only write the exact folder that would be uploaded")
    p.add_argument("--out", help="dry-run folder (default: RUN_DIR/hub-upload)")
    p.set_defaults(func=cmd_push)
    p = sub.add_parser("chat", help="chat with a trained run (streaming; --prompt for one answer)")
    p.add_argument("run_dir", help="run folder, e.g. outputs/quickstart")
    p.add_argument("--prompt", help="answer this one message and exit")
    p.add_argument("--system", help="system prompt (default: the recipe's data.system_prompt; '' for none)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens (default 256)")
    p.add_argument("--temperature", type=float, help="0 = greedy; default: the run's generation config")
    p.add_argument("--merged", action="store_true", help="use RUN_DIR/merged instead of the 4-bit base + adapter")
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("eval", help="held-out loss/perplexity and generation metrics, base vs adapter")
    p.add_argument("run_dir", help="run folder, e.g. outputs/quickstart")
    p.add_argument("--data", help="rows with reference answers (default: the run's held-out split)")
    p.add_argument("--max-samples", type=int, help="rows to generate for (default: evaluation.max_samples)")
    p.add_argument("--max-new-tokens", type=int, help="generation budget (default: evaluation.max_new_tokens)")
    p.add_argument("--batch-size", type=int, help="rows per batch (default: evaluation.batch_size)")
    p.add_argument("--no-base", action="store_true", help="score the adapter only")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("report", help="write RUN_DIR/report/: plots, report.md, report.html")
    p.add_argument("run_dir", help="run folder, e.g. outputs/quickstart")
    p.set_defaults(func=cmd_report)


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
    add_after_training_commands(sub)
    return parser


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[qlora-kit] %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = True  # so pytest (caplog) and host applications can still see the records


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        args.func(args)
    except QloraKitError as exc:
        # Only a command that imported qlora_kit.trainers can be interrupted mid-run; importing it here would cost
        # every other command (report, push, validate) ~10 s of torch/trl imports.
        trainers = sys.modules.get("qlora_kit.trainers")
        if trainers is not None and isinstance(exc, trainers.TrainingInterrupted):
            print(f"qlora-kit: {exc}", file=sys.stderr)
            return 130
        print(f"qlora-kit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qlora-kit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

