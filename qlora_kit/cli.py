"""`qlora-kit` subcommands: argument parsing only. Each command imports what it runs when it runs (torch, trl and
transformers cost seconds to import), so `validate` and `report` stay quick."""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

from qlora_kit.recipe import QloraKitError, load_recipe

log = logging.getLogger("qlora_kit")


def cmd_validate(args: argparse.Namespace) -> None:
    from qlora_kit.data import build_datasets, training_rows
    from qlora_kit.model import check_model_config, check_target_modules, load_tokenizer, local_config_folder
    from qlora_kit.publish import check_push_settings
    from qlora_kit.recipe import check_hub_model_reachable
    from qlora_kit.rundir import check_output_dir, check_run_dir

    recipe = load_recipe(args.recipe, args.overrides)
    rows = training_rows(recipe)
    check_output_dir(recipe)
    earlier = check_run_dir(recipe)
    check_push_settings(recipe)
    check_hub_model_reachable(recipe)
    folder = local_config_folder(recipe.model)
    if folder:
        check_model_config(recipe, folder)
    layers = check_target_modules(recipe, folder) if folder else None
    # the rows tokenized as training tokenizes them (and cached for it): the length limits refuse here, not later.
    # A Hub model in the cache may hold its config and not yet its tokenizer; a local model folder must hold both.
    tokenizer_here = folder and (Path(recipe.model.name).expanduser().is_dir() or any(
        (Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")))
    tokenized = build_datasets(recipe, load_tokenizer(recipe, folder)).stats if tokenizer_here else None
    fate = ("continued, training.resume=auto" if recipe.training.resume == "auto" else
            "replaced, training.overwrite=true")
    print(f"{args.recipe}: valid ({rows} training rows; run folder {recipe.run_dir}"
          f"{f': an earlier run there is {fate}' if earlier else ''})")
    if layers is None:
        print("lora.target_modules: not checked, the model's config is not on this machine (training will check it)")
    else:
        print(f"lora.target_modules: found in the model (its linear layers: {', '.join(layers)})")
    if tokenized is None:
        print("row lengths: not checked, the model's tokenizer is not on this machine (training will check them)")
    else:
        print(f"row lengths: {tokenized['train']['rows']} training rows fit the length limits (tokenized with the "
              "model's tokenizer; `qlora-kit data` shows their lengths)")


def cmd_data(args: argparse.Namespace) -> None:
    """Dry run of the data pipeline: tokenizer only, no model weights."""
    import dataclasses

    import torch

    from qlora_kit.data import (
        build_datasets,
        describe_data,
        longest_packed_pair,
        longest_training_row,
        varying_batch_lengths,
    )
    from qlora_kit.memory import (
        NOT_IN_TOTAL,
        estimate_memory_for_config,
        generation_peak_gib,
        long_context_settings,
        memory_warning,
        rows_of_length,
    )
    from qlora_kit.model import base_model_folder, check_model_config, load_tokenizer
    from qlora_kit.speed.plan import Machine, packed_pair_row, resolve_eager_attention, shares_pair_prefixes

    recipe = load_recipe(args.recipe, args.overrides)
    folder = base_model_folder(recipe.model)
    config = check_model_config(recipe, folder)
    tokenizer = load_tokenizer(recipe, folder)
    data = build_datasets(recipe, tokenizer)
    print(describe_data(data, tokenizer, recipe, color=sys.stdout.isatty()))
    longest = longest_training_row(data, recipe)
    sized = rows_of_length(recipe, longest)
    notes: list[str] = []  # the speed plan's reading of the data, as the training run will decide it
    gpu_run = dataclasses.replace(Machine.measure(), gpus=max(1, torch.cuda.device_count()))  # the estimate's GPU run
    packed = packed_pair_row(shares_pair_prefixes(recipe, gpu_run, notes), longest_packed_pair(data, recipe), notes)
    # decided before the estimate, as in the run: flex attention keeps no eager scores
    sized = resolve_eager_attention(sized, config, gpu_run, notes, varying_batch_lengths(data, recipe))
    memory = estimate_memory_for_config(sized, config, packed_pair_row=packed)
    rows = f" for rows up to {longest} tokens (the longest; max_length {recipe.training.max_length})" \
        if sized is not recipe else ""
    rows += f", pairs packed into rows up to {packed} tokens (speed.shared_prefix)" if packed else ""
    print(f"estimated peak GPU memory{rows}: {memory['total']:.1f} GiB (" + ", ".join(
        f"{k.replace('_', ' ')} {v:.2f}" for k, v in memory.items() if k not in ("total", *NOT_IN_TOTAL)) + ")")
    if warning := memory_warning(memory["total"]):
        print(warning)
    kept = recipe.speed.keep_activations_layers
    if memory["each_kept_layer"] and not (kept == "auto" and long_context_settings(recipe.speed)):
        print(f"speed.keep_activations_layers ({kept}): {memory['each_kept_layer']:.2f} GiB more per layer that keeps "
              "its activations" + (", as many as fit on the GPU when training starts" if kept == "auto" else ""))
    if memory["cpu_offloaded_checkpoints"]:
        print("host memory for the offloaded checkpoints (speed.offload_checkpoints): "
              f"{memory['cpu_offloaded_checkpoints']:.2f} GiB")
    if memory["generation_kv_cache"]:
        print(f"while GRPO samples: {generation_peak_gib(memory, with_copy=False):.1f} GiB (KV cache "
              f"{memory['generation_kv_cache']:.2f}), {memory['generation_copy']:.2f} GiB more with the merged copies "
              f"of speed.generation_weights: bf16 ({recipe.speed.generation_weights}: the speed plan decides)")


def cmd_train(args: argparse.Namespace) -> None:
    from qlora_kit.pipeline import run_training

    run_training(load_recipe(args.recipe, args.overrides))


def cmd_merge(args: argparse.Namespace) -> None:
    from qlora_kit.export import merge_adapter

    print(merge_adapter(args.run_dir, args.out, dtype=args.dtype, base=args.base, device=args.device))


def cmd_export(args: argparse.Namespace) -> None:
    from qlora_kit.gguf import export_run

    print(export_run(args.run_dir, args.format, args.quant, args.out, force=args.force))


def cmd_push(args: argparse.Namespace) -> None:
    from qlora_kit.publish import push_run

    print(push_run(args.run_dir, args.repo_id, merged=args.merged, private=args.private, base_model=args.base_model,
                   dry_run=args.dry_run, out=args.out, gguf=args.gguf))


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


def positive_int(text: str) -> int:
    """argparse type: a count that must be at least 1 (refused before any model loads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def temperature(text: str) -> float:
    """argparse type: a sampling temperature, finite and >= 0 (0 = greedy)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a number >= 0 (0 = greedy)")
    return value


def message(text: str) -> str:
    """argparse type: a chat message with some text in it (an empty one would sample from the template alone)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the message is empty; write the message the model should answer")
    return text


def add_after_training_commands(sub) -> None:
    """push / chat / eval / report: everything that reads a finished run folder."""
    p = sub.add_parser("push", help="upload a run's adapter (or merged model) with a model card to the Hub")
    p.add_argument("run_dir", help="run folder, e.g. outputs/quickstart")
    p.add_argument("--repo-id", required=True, help="Hub repo USER/NAME (or ORG/NAME); created if missing")
    p.add_argument("--merged", action="store_true", help="upload the merged model (merging first if needed)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--base-model", help="Hub id of the base model, for the card and adapter_config.json, when "
                                        "training used a local folder or GGUF")
    p.add_argument("--gguf", action="store_true", help="also upload the run's GGUF files (exporting q8_0 first if "
                                                       "there is none) and a Modelfile")
    p.add_argument("--dry-run", action="store_true", help="only write the exact folder that would be uploaded")
    p.add_argument("--out", help="dry-run folder (default: RUN_DIR/hub-upload)")
    p.set_defaults(func=cmd_push)
    p = sub.add_parser("chat", help="chat with a trained run (streaming; --prompt for one answer)")
    p.add_argument("run_dir", help="run folder, e.g. outputs/quickstart")
    p.add_argument("--prompt", type=message, help="answer this one message and exit")
    p.add_argument("--system", help="system prompt (default: the recipe's data.system_prompt; '' for none)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="longest answer, in tokens (default 256)")
    p.add_argument("--temperature", type=temperature, help="0 = greedy; default: the run's generation config")
    p.add_argument("--merged", action="store_true", help="use RUN_DIR/merged instead of the 4-bit base + adapter")
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("eval", help="held-out loss/perplexity and generation metrics, base vs adapter")
    p.add_argument("run_dir", help="run folder, e.g. outputs/quickstart")
    p.add_argument("--data", help="rows with reference answers (default: the run's held-out split)")
    p.add_argument("--max-samples", type=positive_int, help="rows to generate for (default: evaluation.max_samples)")
    p.add_argument("--max-new-tokens", type=positive_int,
                   help="generation budget (default: evaluation.max_new_tokens)")
    p.add_argument("--batch-size", type=positive_int, help="rows per batch (default: evaluation.batch_size)")
    p.add_argument("--no-base", action="store_true", help="score the adapter only")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("report", help="write RUN_DIR/report/: plots, report.md, report.html")
    p.add_argument("run_dir", help="run folder, e.g. outputs/quickstart")
    p.set_defaults(func=cmd_report)


def versions() -> str:
    """qlora-kit's version and the libraries it drives, from package metadata (no imports)."""
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    libraries = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")
    return f"qlora-kit {version('qlora-kit')} (" + ", ".join(f"{n} {version(n)}" for n in libraries) + ")"


class VerboseParser(argparse.ArgumentParser):
    """Every subcommand takes -v/--verbose, before or after its arguments."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                          help="show the libraries' own warnings and logs (transformers, trl, bitsandbytes, ...)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-kit", description="QLoRA fine-tuning from YAML recipes.")
    parser.add_argument("--version", action="version", version=versions())
    parser.add_argument("-v", "--verbose", action="store_true", default=False,
                        help="show the libraries' own warnings and logs (transformers, trl, bitsandbytes, ...)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=VerboseParser)
    for name, func, text in [("validate", cmd_validate, "check a recipe and its data without loading weights"),
                             ("data", cmd_data, "dry run: rows, lengths, masks and a memory estimate, no weights"),
                             ("train", cmd_train, "fine-tune (same as `accelerate launch train.py RECIPE`)")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("recipe", help="recipe YAML file")
        p.add_argument("overrides", nargs="*", default=[],
                       help="dotted overrides, e.g. training.learning_rate=1e-4 lora.r=32")
        p.set_defaults(func=func)
    p = sub.add_parser("merge", help="merge a run's adapter into its base (fp32 arithmetic), checked before writing")
    p.add_argument("run_dir", help="run folder, e.g. outputs/quickstart")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="dtype of the written model (default: the recipe's model.dtype; auto = bf16 on a GPU, fp32 "
                        "on CPU)")
    p.add_argument("--base", choices=("original", "dequantized"), default="original",
                   help="original: full-precision W + BA (default); dequantized: dequantize(NF4(W)) + BA, exactly "
                        "the 4-bit model that was trained and evaluated")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="where the per-layer merge arithmetic runs (default: cuda when there is a GPU)")
    p.add_argument("--out", help="where to write the merged model (default: RUN_DIR/merged)")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("export", help="write a run as GGUF (llama.cpp), a LoRA GGUF, or an Ollama folder; checked")
    p.add_argument("run_dir", help="run folder, e.g. outputs/quickstart")
    p.add_argument("--format", choices=["gguf", "gguf-lora", "ollama"], default="gguf",
                   help="gguf: the merged model; gguf-lora: the adapter for llama-cli --lora; ollama: GGUF + Modelfile")
    p.add_argument("--quant", help="f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0 (default q8_0; gguf-lora: f16)")
    p.add_argument("--out", help="output file (gguf, gguf-lora) or folder (ollama); default under RUN_DIR")
    p.add_argument("--force", action="store_true",
                   help="replace an existing export qlora-kit wrote (never anything else)")
    p.set_defaults(func=cmd_export)
    add_after_training_commands(sub)
    return parser


LIBRARIES = ("transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "huggingface_hub", "torch")


def setup_logging(verbose: bool = False) -> None:
    """qlora-kit's own lines always; the libraries' warnings and logs only with -v (bitsandbytes' "Failed to load
    CPU kernels" on every CPU start reads like an error, and is not one)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[qlora-kit] %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = True  # so pytest (caplog) and host applications can still see the records
    if verbose:
        return
    # transformers and datasets set their loggers' levels from these when imported; the loggers of libraries
    # imported already are set directly.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    if "datasets" in sys.modules:  # imported already (qlora-kit used as a library): its progress bars read no env
        sys.modules["datasets"].disable_progress_bars()
    warnings.filterwarnings("ignore", module=r"(" + "|".join(LIBRARIES) + r")(\.|$)")


# File-system errors about the user's machine or the paths they gave (a full disk, permissions, an --out under a
# file, a name too long): the user's to fix, said in one line; any other OSError is a bug.
USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                  errno.ENAMETOOLONG}
OS_ERROR_HINTS = {errno.ENOTDIR: "a part of that path is a file, not a folder: pick another path"}


def write_crash_log(args: argparse.Namespace) -> Path:
    """The full traceback of an internal error: in the run folder when the command names one, else a temp file."""
    text = f"{versions()}\ncommand: qlora-kit {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}"
    name = f"qlora-kit-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    run_dir = Path(getattr(args, "run_dir", None) or "")
    if getattr(args, "run_dir", None) and run_dir.is_dir() and os.access(run_dir, os.W_OK):
        path = run_dir / name
        path.write_text(text)
        return path
    handle, path = tempfile.mkstemp(prefix=name.removesuffix(".log") + ".", suffix=".log")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    """Any user error: one line and exit 2. Any other exception: a bug; its traceback goes to a log file, exit 1."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
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
    except OSError as exc:
        if exc.errno not in USER_OS_ERRORS:
            return report_bug(args, exc)
        where = f": {exc.filename}" if exc.filename else ""
        hint = f" ({OS_ERROR_HINTS[exc.errno]})" if exc.errno in OS_ERROR_HINTS else ""
        print(f"qlora-kit: error: {exc.strerror or exc}{where}{hint}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the one place every other failure is turned into a bug report
        return report_bug(args, exc)
    return 0


def report_bug(args: argparse.Namespace, exc: BaseException) -> int:
    if getattr(args, "verbose", False):
        traceback.print_exc()
    try:
        where = f"the full traceback is in {write_crash_log(args)}"
    except OSError:
        where = "no log could be written; run again with -v to see the traceback"
    print(f"qlora-kit: internal error: {type(exc).__name__}: {str(exc)[:300]}\nThis is a bug in qlora-kit, not a "
          f"problem with your recipe or data; {where}. Please report it with that file.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

