"""Run report: PNG plots of the logged metrics and a markdown + HTML summary of a run folder.

Everything is read back from the run folder (metrics.jsonl, summary.json, recipe.yaml, eval.json), so `qlora-kit
report RUN_DIR` rebuilds the same report that training wrote at its end. The HTML is one self-contained file (plots
embedded), to attach or open anywhere.
"""

from __future__ import annotations

import base64
import fnmatch
import html
import json
import logging
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from qlora_kit.recipe import QloraKitError
from qlora_kit.rundir import atomic_folder, damaged_adapter, refuse_foreign_output, saved_part_errors

log = logging.getLogger("qlora_kit")

# (file name, title, metrics.jsonl keys drawn as lines, y label)
PLOTS = [
    ("loss.png", "Loss", ("loss", "eval_loss"), "loss (sft: cross-entropy per trained token)"),
    ("rewards.png", "Rewards (preference methods)", ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                                     "eval_rewards/margins"), "implicit reward"),
    ("reward_accuracy.png", "Reward accuracy (preference methods)", ("rewards/accuracies",
                                                                     "eval_rewards/accuracies"),
     "share of pairs: chosen reward > rejected"),
    ("learning_rate.png", "Learning rate", ("learning_rate",), "learning rate"),
    ("grad_norm.png", "Gradient norm", ("grad_norm",), "global L2 norm before clipping"),
    # GRPO (trl's GRPOTrainer logs these); a key with * stands for every logged key it matches
    ("grpo_reward.png", "Reward (GRPO)", ("reward", "reward_std"),
     "weighted reward sum: mean and spread over completions"),
    ("grpo_reward_functions.png", "Reward per function (GRPO)", ("rewards/*/mean",), "mean reward (unweighted)"),
    ("grpo_completion_length.png", "Completion length (GRPO)",
     ("completions/mean_length", "completions/mean_terminated_length"), "tokens"),
    ("kl.png", "KL to the starting model", ("kl",), "mean per-token KL"),
]
LABELS = {"loss": "train loss", "eval_loss": "eval loss", "reward": "mean", "reward_std": "standard deviation",
          "completions/mean_length": "all completions", "completions/mean_terminated_length": "ended by EOS"}


# ------------------------------------------------------------------------------------------------ reading


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of <run>/metrics.jsonl (one per trainer log call). A torn last line (a killed run) is skipped
    quietly; any other line that is not a JSON object is skipped with a warning that counts them."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records, skipped = [], []
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip() and number < len(lines):
            skipped.append(number)
    if skipped:
        log.warning("%s: %d line(s) are not metric records and were left out (line %s%s)", path, len(skipped),
                    ", ".join(map(str, skipped[:5])), ", ..." if len(skipped) > 5 else "")
    return records


def series(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric, in logging order, keeping the last value logged at each step."""
    points: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            points[int(record.get("step", 0))] = float(value)
    return sorted(points.items())


WRITTEN_BY = {"summary.json": "training writes it when it ends", "eval.json": "`qlora-kit eval RUN_DIR` writes it"}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON record the run wrote (summary.json, eval.json, an export's check), or {} where there is none."""
    if not path.is_file():
        return {}
    fix = WRITTEN_BY.get(path.name, "qlora-kit wrote it")
    with saved_part_errors(path, "it as JSON", f"{fix}; the copy here is damaged: move it away to go on without it"):
        return json.loads(path.read_text())


def read_recipe_dict(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        raise QloraKitError(f"{run_dir}: not a qlora-kit run folder (no recipe.yaml); pass outputs/<run_name>")
    with saved_part_errors(path, "the run's recipe", damaged_adapter(run_dir)):
        recipe = yaml.safe_load(path.read_text()) or {}
    if not isinstance(recipe, dict):
        raise QloraKitError(f"{path}: not the recipe qlora-kit saved (a YAML {type(recipe).__name__}, not a mapping "
                            f"of sections); {damaged_adapter(run_dir)}")
    return recipe


def adapter_parameter_count(run_dir: Path) -> int | None:
    """Parameters stored in the adapter file: the trainable ones (LoRA A/B plus modules_to_save)."""
    path = run_dir / "adapter" / "adapter_model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "np") as handle:
        count = 0
        for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
            shape = handle.get_slice(key).get_shape()
            size = 1
            for dim in shape:
                size *= dim
            count += size
    return count


# -------------------------------------------------------------------------------------------------- plots


def plot_metrics(records: list[dict[str, Any]], folder: Path) -> list[Path]:
    """One PNG per metric family that was logged at least once; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    logged = list(dict.fromkeys(key for record in records for key in record))
    for name, title, patterns, ylabel in PLOTS:
        keys = [key for pattern in patterns for key in (fnmatch.filter(logged, pattern) if "*" in pattern
                                                         else [pattern])]
        lines = {key: series(records, key) for key in keys}
        lines = {key: points for key, points in lines.items() if points}
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        for key, points in lines.items():
            steps, values = zip(*points, strict=True)
            evaluation = key.startswith("eval")
            ax.plot(steps, values, marker="s" if evaluation else "o" if len(points) < 30 else None,
                    markersize=5 if evaluation else 3,
                    label=LABELS.get(key, key.removeprefix("rewards/").removesuffix("/mean")))
        values = [v for points in lines.values() for _, v in points]
        if name == "loss.png" and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")  # a loss falling by orders of magnitude is flat on a linear axis
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        if name == "learning_rate.png":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend()
        fig.tight_layout()
        fig.savefig(folder / name)
        plt.close(fig)
        written.append(folder / name)
    return written


# ------------------------------------------------------------------------------------------ summary facts


def data_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """PreparedData.stats without the per-row length lists, plus their mean / median / p95 / max (for summary.json)."""
    compact: dict[str, Any] = {}
    for split, values in stats.items():
        if not isinstance(values, dict):
            compact[split] = values
            continue
        lengths = values.get("lengths") or []
        compact[split] = {k: v for k, v in values.items() if not k.endswith("lengths")}
        for key, part in values.items():  # preference rows: prompt / chosen / rejected / completion lengths
            if key.endswith("_lengths") and part:
                compact[split][key.removesuffix("s")] = {"median": statistics.median(part), "max": max(part)}
        if lengths:
            ordered = sorted(lengths)
            compact[split]["length"] = {"mean": statistics.fmean(ordered), "median": statistics.median(ordered),
                                        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
                                        "max": ordered[-1]}
    return compact


@dataclass
class Fact:
    name: str
    value: str


def fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def run_facts(run_dir: Path, records: list[dict[str, Any]], summary: dict[str, Any]) -> list[Fact]:
    """The headline numbers of a run, each with how it was measured."""
    import math

    facts = []
    losses = series(records, "loss")
    if losses:
        step, value = losses[-1]
        facts.append(Fact("final train loss", f"{value:.4g} (step {step}, last value in metrics.jsonl)"))
    if "train_loss" in summary:
        facts.append(Fact("mean train loss", f"{summary['train_loss']:.4g} (averaged over all steps)"))
    eval_loss = summary.get("eval_loss")
    if eval_loss is None and series(records, "eval_loss"):
        eval_loss = series(records, "eval_loss")[-1][1]
    if eval_loss is not None:
        facts.append(Fact("eval loss", f"{eval_loss:.4g} (perplexity {math.exp(min(eval_loss, 700)):.4g})"))
    epochs = [r["epoch"] for r in records if isinstance(r.get("epoch"), (int, float))]
    if "global_step" in summary:
        facts.append(Fact("steps", f"{summary['global_step']}" + (f" ({epochs[-1]:.2f} epochs)" if epochs else "")))
    if "train_tokens_per_second" in summary:
        per_step = summary.get("seconds_per_step")
        extra = f", {per_step:.3g} s/step over {summary.get('measured_steps', '?')} steps" if per_step else ""
        facts.append(Fact("throughput", f"{summary['train_tokens_per_second']:.4g} tokens/s{extra} (after warm-up)"))
    peak, reserved = summary.get("peak_gpu_memory_gib"), summary.get("peak_reserved_gpu_memory_gib")
    held = f", {reserved:.2f} GiB held by the allocator" if isinstance(reserved, (int, float)) else ""
    facts.append(Fact("peak GPU memory", f"{peak:.2f} GiB (torch.cuda.max_memory_allocated){held}"
                      if peak is not None else "n/a (no CUDA device)"))
    trainable, total = summary.get("trainable_parameters"), summary.get("total_parameters")
    if trainable is None:
        trainable = adapter_parameter_count(run_dir)
    if trainable is not None:
        share = f" of {total:,} ({100 * trainable / total:.2f}%)" if total else " (counted in the adapter file)"
        facts.append(Fact("trainable parameters", f"{trainable:,}{share}"))
    return facts


def data_table(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["split", "rows", "tokens", "trained tokens", "mean length", "longest", "truncated", "dropped"]
    rows = []
    for split in ("train", "validation"):
        s = data.get(split)
        if not s:
            continue
        length = s.get("length", {})
        dropped = s.get("dropped_too_long", 0) + s.get("dropped_no_trained_tokens", 0)
        rows.append([split, f"{s.get('rows', 0):,}", f"{s.get('tokens', 0):,}", f"{s.get('trained_tokens', 0):,}",
                     fmt(length.get("mean"), 3), str(length.get("max", "n/a")), str(s.get("truncated", 0)),
                     str(dropped)])
    return header, rows


def generation_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    generation = summary.get("generation")
    if not generation:
        return None
    before, after = generation["before"], generation["after"]
    header = ["metric", "rows", "before training", "after training"]
    if before["metric"] != "reward":
        return header, [[before["metric"], str(before["rows"]), f"{before['score']:.1%}", f"{after['score']:.1%}"]]
    # GRPO: the weighted sum of the rewards on greedy completions, then each reward's own mean
    rows = [["reward (weighted sum)", str(before["rows"]), f"{before['score']:.3f}", f"{after['score']:.3f}"]]
    rows += [[f"reward {name}", str(before["rows"]), f"{value:.3f}", f"{after['per_reward'][name]:.3f}"]
             for name, value in before.get("per_reward", {}).items()]
    return header, rows


def preference_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    scores = summary.get("preference")
    if not scores:
        return None
    before, after = scores["before"], scores["after"]
    return (["held-out pairs", "before training", "after training"],
            [["preference accuracy (log p chosen > log p rejected)", f"{before['accuracy']:.1%}",
              f"{after['accuracy']:.1%}"],
             ["mean log-probability margin, chosen - rejected (nats)", f"{before['margin']:.3g}",
              f"{after['margin']:.3g}"]])


def eval_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """`qlora-kit eval`'s eval.json as a table: one row per metric, base | adapter | change."""
    if not report:
        return None
    results = report["results"]
    columns = [name for name in ("base", "adapter") if name in results]
    header = ["metric", *columns] + (["change"] if len(columns) == 2 else [])
    rows = []

    def add(name: str, values: list[float | None], as_percent: bool) -> None:
        shown = ["n/a" if v is None else f"{v:.1%}" if as_percent else f"{v:.4g}" for v in values]
        if len(values) == 2:
            if None in values:
                shown.append("n/a")
            else:
                delta = values[1] - values[0]
                shown.append(f"{100 * delta:+.1f} pts" if as_percent else f"{delta:+.4g}")
        rows.append([name, *shown])

    add("loss", [results[c]["loss"] for c in columns], False)
    add("perplexity", [results[c]["perplexity"] for c in columns], False)
    for metric in results[columns[0]]["scores"]:
        if all(metric in results[c]["scores"] for c in columns):
            add(metric, [results[c]["scores"][metric] for c in columns], True)
    return header, rows


def eval_note(report: dict[str, Any]) -> str:
    return (f"{report['rows']} rows from {report['data']}; generation metrics on the first "
            f"{report['generated_rows']} (greedy, at most {report['max_new_tokens']} new tokens).")


# ------------------------------------------------------------------------------------------------ writing


Block = tuple  # ("h1"|"h2"|"p"|"pre"|"img"|"table", ...)


def report_blocks(run_dir: Path, plots: list[Path]) -> list[Block]:
    recipe = read_recipe_dict(run_dir)
    records = read_metrics(run_dir)
    summary = read_json(run_dir / "summary.json")
    evaluation = read_json(run_dir / "eval.json")
    model = recipe.get("model", {})
    base = model.get("name", "?") + (f" ({model['gguf_file']})" if model.get("gguf_file") else "")
    lora, q, t = recipe.get("lora", {}), recipe.get("quantization", {}), recipe.get("training", {})
    quant = (f"4-bit {q.get('quant_type')}" + (" + double quant" if q.get("double_quant") else "")
             if q.get("load_in_4bit") else "8-bit" if q.get("load_in_8bit") else "not quantized")
    blocks: list[Block] = [
        ("h1", f"Run report: {run_dir.name}"),
        ("p", f"Base model {base}, {quant}; LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, targets "
              f"{lora.get('target_modules')}; learning rate {t.get('learning_rate')}, batch {t.get('batch_size')} x "
              f"{t.get('gradient_accumulation_steps')} accumulation, max_length {t.get('max_length')}."),
    ]
    if not summary:
        blocks.append(("p", "summary.json is missing: training did not finish, so only the logged metrics are shown."))
    facts = run_facts(run_dir, records, summary)
    blocks += [("h2", "Summary"), ("table", ["", "value"], [[f.name, f.value] for f in facts])]
    if summary.get("data"):
        blocks += [("h2", "Data"), ("table", *data_table(summary["data"]))]
    tables = [("Generation on the held-out split (during training)", generation_table(summary)),
              (f"Preferences on the {summary.get('preference', {}).get('pairs')} held-out pairs",
               preference_table(summary)),
              ("Evaluation (`qlora-kit eval`: base vs adapter)", eval_table(evaluation))]
    if any(table for _, table in tables):
        blocks.append(("h2", "Evaluation"))
        for title, table in tables:
            if table:
                blocks += [("p", title), ("table", *table)]
        if evaluation:
            blocks.append(("p", eval_note(evaluation)))
    if plots:
        blocks.append(("h2", "Plots"))
        blocks += [("img", p.name, p.stem.replace("_", " ")) for p in plots]
    else:
        blocks.append(("p", "No metrics logged yet (metrics.jsonl is empty), so there are no plots."))
    tensorboard = sorted((run_dir / "checkpoints" / "runs").glob("*")) if (run_dir / "checkpoints").is_dir() else []
    if tensorboard:
        blocks.append(("p", f"TensorBoard logs: `tensorboard --logdir {run_dir / 'checkpoints' / 'runs'}`"))
    versions = recipe.get("versions", {})
    if versions:
        blocks.append(("p", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())))
    return blocks


def render_markdown(blocks: list[Block]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind == "h1":
            out.append(f"# {rest[0]}")
        elif kind == "h2":
            out.append(f"## {rest[0]}")
        elif kind == "p":
            out.append(rest[0])
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})")
        elif kind == "table":
            header, rows = rest
            out.append("\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                                 + ["| " + " | ".join(row) + " |" for row in rows]))
    return "\n\n".join(out) + "\n"


def render_html(blocks: list[Block], folder: Path, title: str) -> str:
    def code(text: str) -> str:  # `inline code` -> <code>, the only markdown the blocks use
        parts = html.escape(text).split("`")
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))

    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{code(rest[0])}</{kind}>")
        elif kind == "img":
            data = base64.b64encode((folder / rest[0]).read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(rest[1])}" src="data:image/png;base64,{data}"></figure>')
        elif kind == "table":
            header, rows = rest
            head = "".join(f"<th>{code(h)}</th>" for h in header)
            cells = "".join("<tr>" + "".join(f"<td>{code(c)}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:56rem;margin:2rem auto;padding:0 1rem;color:#222}"
             "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;"
             "text-align:left}th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 .2rem}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(run_dir: str | Path) -> Path:
    """Write <run>/report/: loss.png, learning_rate.png, grad_norm.png, report.md, report.html. Returns the folder.

    The folder is written under a temporary name and swapped in, so a reader never sees half a report.
    """
    run_dir = Path(run_dir)
    read_recipe_dict(run_dir)  # fails early, with the usual message, on a folder that is not a run
    target = run_dir / "report"
    refuse_foreign_output(target)
    with atomic_folder(target) as partial:
        plots = plot_metrics(read_metrics(run_dir), partial)
        blocks = report_blocks(run_dir, plots)
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        blocks.insert(1, ("p", f"Generated {stamp} by qlora-kit from `{run_dir}`."))
        (partial / "report.md").write_text(render_markdown(blocks))
        (partial / "report.html").write_text(render_html(blocks, partial, f"qlora-kit run {run_dir.name}"))
    log.info("report written to %s (%s)", target, ", ".join(p.name for p in plots) or "no plots")
    return target

