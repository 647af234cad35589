"""Held-out evaluation: loss/perplexity on the reference answers and generation metrics, for the adapter and its base.

`evaluate_generation` scores one model during training (before/after); `evaluate_run` is `qlora-kit eval`: it loads a
finished run once (4-bit base + adapter, as trained) and scores it with the adapter on and off, so the before/after
comparison is one table.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from qlora_kit.data import Conversation, render
from qlora_kit.recipe import EvaluationSection, QloraKitError, Recipe, read_run_recipe
from qlora_kit.rundir import damaged_adapter, damaged_merged, saved_part_errors, trained_adapter, write_atomically

log = logging.getLogger("qlora_kit")

METRICS = ("exact_match", "contains", "json_equal")


@dataclass
class GenerationScore:
    metric: str
    score: float
    rows: int
    examples: list[dict[str, str]] = field(default_factory=list)
    per_reward: dict[str, float] = field(default_factory=dict)  # GRPO: each reward's mean (unweighted)


class Progress:
    """Logs `what: done/total batches, about 1m20s left` every `every` seconds at most (and at the end), so a long
    evaluation on a CPU is never silent."""

    def __init__(self, total: int, what: str, every: float = 10.0) -> None:
        self.total, self.what, self.every = total, what, every
        self.done = 0
        self.start = self.last = time.monotonic()

    def step(self, label: str) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        left = (now - self.start) / self.done * (self.total - self.done)
        tail = f"about {format_duration(left)} left" if self.done < self.total else \
            f"done in {format_duration(now - self.start)}"
        log.info("%s: %d/%d batches (%s), %s", self.what, self.done, self.total, label, tail)


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


@torch.no_grad()
def generate_answers(model, tokenizer: PreTrainedTokenizerBase, prompts: list[Conversation], max_new_tokens: int,
                     batch_size: int, stop_ids: list[int], progress: Progress | None = None,
                     label: str = "generation") -> list[str]:
    """Greedy answers, left-padded batches, stopping on any end-of-turn id (so trained models stop on their own)."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [render(tokenizer, p, add_generation_prompt=True) for p in prompts[start: start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                 pad_token_id=tokenizer.pad_token_id)
            new_tokens = out[:, batch["input_ids"].shape[1]:]
            answers += [a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
            if progress is not None:
                progress.step(label)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


@dataclass
class PreferenceScore:
    """How a model ranks held-out pairs: the share whose chosen answer has the higher log-probability, and the mean
    log-probability margin chosen - rejected (nats, summed over each answer's tokens)."""

    accuracy: float
    margin: float
    pairs: int


@torch.no_grad()
def answer_log_probs(model, prompt_ids: list[list[int]], answer_ids: list[list[int]], pad_id: int,
                     batch_size: int) -> list[float]:
    """Summed log-probability of each answer after its prompt (right-padded batches, eval mode)."""
    was_training = model.training
    model.eval()
    totals: list[float] = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            rows = [p + a for p, a in zip(prompt_ids[start:start + batch_size], answer_ids[start:start + batch_size],
                                          strict=True)]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=model.device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=model.device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            token_logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            for i, prompt in enumerate(prompt_ids[start:start + batch_size]):
                first, last = len(prompt) - 1, len(rows[i]) - 1  # positions predicting the answer's tokens
                totals.append(token_logps[i, first:last].sum().item())
    finally:
        model.train(was_training)
    return totals


def evaluate_preferences(model, pairs, pad_id: int, batch_size: int) -> PreferenceScore:
    """Score held-out pairs (rows with prompt_ids / chosen_ids / rejected_ids) with the model as it is now."""
    prompts = [list(r) for r in pairs["prompt_ids"]]
    chosen = answer_log_probs(model, prompts, [list(r) for r in pairs["chosen_ids"]], pad_id, batch_size)
    rejected = answer_log_probs(model, prompts, [list(r) for r in pairs["rejected_ids"]], pad_id, batch_size)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return PreferenceScore(sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins), len(margins))


def format_preference_comparison(before: PreferenceScore, after: PreferenceScore, beta: float | None) -> str:
    """One line; with DPO's beta, the mean implicit reward margin too (beta x the change of the log-prob margin)."""
    reward = f" (DPO reward margin {beta * (after.margin - before.margin):+.3f})" if beta is not None else ""
    return (f"held-out pairs ({after.pairs}): preference accuracy {before.accuracy:.1%} -> {after.accuracy:.1%}; "
            f"log-prob margin chosen - rejected {before.margin:+.2f} -> {after.margin:+.2f} nats{reward}")


_NOT_JSON = object()


def parse_json(text: str) -> Any:
    try:
        return json.loads(text.strip())
    except ValueError:
        return _NOT_JSON


def matches(answer: str, reference: str, metric: str) -> bool:
    """exact_match: same text (outer whitespace ignored); contains: the reference appears in the answer;
    json_equal: both parse as JSON and are equal (key order and spacing ignored)."""
    if metric == "exact_match":
        return answer.strip() == reference.strip()
    if metric == "contains":
        return reference.strip() in answer
    if metric == "json_equal":
        parsed = parse_json(answer)
        return parsed is not _NOT_JSON and parsed == parse_json(reference)
    raise ValueError(metric)


def evaluate_generation(model, tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation],
                        section: EvaluationSection, stop_ids: list[int]) -> GenerationScore:
    rows = conversations[: section.max_samples]
    prompts = [c[:-1] for c in rows]
    references = [c[-1]["content"] for c in rows]
    answers = generate_answers(model, tokenizer, prompts, section.max_new_tokens, section.batch_size, stop_ids)
    hits = [matches(a, r, section.metric) for a, r in zip(answers, references, strict=False)]
    examples = [{"prompt": p[-1]["content"], "reference": r, "answer": a}
                for p, r, a in zip(prompts[:3], references[:3], answers[:3], strict=False)]
    return GenerationScore(section.metric, sum(hits) / len(hits), len(hits), examples)


def evaluate_rewards(model, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], rewards: list,
                     section: EvaluationSection, max_new_tokens: int, stop_ids: list[int]) -> GenerationScore:
    """GRPO's held-out score: greedy completions of the held-out prompts, scored by the recipe's rewards as trl
    scores them in training (same arguments); `score` is the mean weighted sum, `per_reward` each reward's mean."""
    from qlora_kit.rewards import weighted_total

    rows = rows[: section.max_samples]
    prompts = [row["prompt"] for row in rows]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens, section.batch_size, stop_ids)
    completions = [[{"role": "assistant", "content": answer}] for answer in answers]  # trl's form for chat prompts
    names = sorted({key for row in rows for key in row if key != "prompt"})
    columns = {name: [row.get(name) for row in rows] for name in names}
    completion_ids = [tokenizer(answer, add_special_tokens=False).input_ids for answer in answers]
    per_reward = [reward(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
                  for reward in rewards]
    totals = weighted_total(rewards, per_reward)
    examples = [{"prompt": p[-1]["content"], "answer": a, "reward": f"{t:.3g}"}
                for p, a, t in zip(prompts[:3], answers[:3], totals[:3], strict=False)]
    means = {reward.__name__: sum(values) / len(values) for reward, values in zip(rewards, per_reward, strict=True)}
    return GenerationScore("reward", sum(totals) / len(totals), len(totals), examples, means)


def format_comparison(before: GenerationScore, after: GenerationScore) -> str:
    if before.metric == "reward":
        lines = [f"mean reward on {before.rows} held-out prompts (greedy): before {before.score:.3f} -> after "
                 f"{after.score:.3f}"]
        lines += [f"  {name}: {before.per_reward[name]:.3f} -> {after.per_reward[name]:.3f}" for name in
                  before.per_reward]
        for example in after.examples[:2]:
            lines.append("  example: " + json.dumps(example, ensure_ascii=False))
        return "\n".join(lines)
    lines = [f"{before.metric} on {before.rows} held-out rows: before {before.score:.1%} -> after {after.score:.1%}"]
    for example in after.examples[:2]:
        lines.append("  example: " + json.dumps(example, ensure_ascii=False))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- loading a run


@dataclass
class TrainedModel:
    """A finished run loaded for inference: the model, the training tokenizer (and chat template), stop ids."""

    model: Any
    tokenizer: PreTrainedTokenizerBase
    stop_ids: list[int]
    generation_config: Any
    recipe: Recipe
    run_dir: Path
    merged: bool


def load_trained_model(run_dir: str | Path, merged: bool = False) -> TrainedModel:
    """The run's adapter on its base, quantized as in training (or `merged=True`: <run>/merged with plain transformers).

    The tokenizer, its chat template and the generation config (whose EOS lists every end-of-turn id) come from the
    adapter folder, so inference formats and stops exactly as training taught.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from qlora_kit.model import base_model_folder, end_of_turn_token_ids, load_base_model, resolve_dtype

    run_dir = Path(run_dir)
    recipe = read_run_recipe(run_dir)
    adapter, merged_folder = run_dir / "adapter", run_dir / "merged"
    has_adapter, has_merged = (adapter / "adapter_config.json").is_file(), (merged_folder / "config.json").is_file()
    if merged and not has_merged:
        fix = f"run `qlora-kit merge {run_dir}` first" if has_adapter else "train the recipe first"
        raise QloraKitError(f"{run_dir}: no merged model in {merged_folder}; {fix}")
    # merge_adapter saves the training tokenizer and generation config next to the merged weights too
    source = merged_folder if merged else adapter
    what, remedy = (("the merged model", damaged_merged(run_dir)) if merged else
                    ("the trained adapter", damaged_adapter(run_dir)))
    if merged:
        with saved_part_errors(source, f"{what}'s tokenizer", remedy):
            tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        missing = (f"only the merged model is left ({merged_folder}): `qlora-kit chat --merged {run_dir}` uses it"
                   if has_merged else "train the recipe first")
        _, tokenizer = trained_adapter(run_dir, missing)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if merged:
        folder = merged_folder
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with saved_part_errors(folder, what, remedy):
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=resolve_dtype(recipe.model.dtype, "model.dtype"), device_map=device)
    else:
        from peft import PeftModel

        compute_dtype = resolve_dtype(recipe.quantization.compute_dtype, "quantization.compute_dtype")
        base = load_base_model(recipe, base_model_folder(recipe.model), compute_dtype)
        with saved_part_errors(adapter, what, remedy):
            model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    has_config = (source / "generation_config.json").is_file()
    with saved_part_errors(source, f"{what}'s generation config", remedy):
        generation_config = GenerationConfig.from_pretrained(source) if has_config else model.generation_config
    stop_ids = end_of_turn_token_ids(tokenizer, generation_config.eos_token_id)
    return TrainedModel(model, tokenizer, stop_ids, generation_config, recipe, run_dir, merged)


# -------------------------------------------------------------------------------------------- qlora-kit eval


@dataclass
class EvalResult:
    """Scores of one model (the base, or base + adapter) on the same rows."""

    loss: float | None
    perplexity: float | None
    scores: dict[str, float]
    examples: list[dict[str, str]] = field(default_factory=list)


def heldout_rows(recipe: Recipe, data_file: str | None) -> tuple[list[dict], str]:
    """Rows to evaluate on, and a description: `data_file`, or the run's own held-out split (same seed, same rows)."""
    from qlora_kit.data import BadRows, load_rows, mix_sources, reference_rows, split_validation
    from qlora_kit.recipe import DatasetSource

    try:
        if data_file is not None:
            path = Path(data_file).expanduser().absolute()  # read from the folder the command runs in
            if not path.exists():
                raise QloraKitError(f"--data: file not found: {data_file} (looked for {path})")
            rows = load_rows(DatasetSource(path=str(path)), recipe.data.system_prompt, method=recipe.method)
            return reference_rows(rows), data_file
        if recipe.data.validation is None:
            raise QloraKitError(f"{recipe.source}: the run has no held-out split (data.validation is null); pass "
                                "--data FILE with reference answers")
        bad = BadRows() if recipe.data.on_bad_rows == "skip" else None
        _, held_out = split_validation(mix_sources(recipe, bad), recipe)
    except OSError as exc:
        raise QloraKitError(f"{recipe.source}: cannot read the run's data ({exc}); pass --data FILE") from None
    return reference_rows(held_out), f"the run's held-out split (data.validation: {recipe.data.validation})"


@torch.no_grad()
def heldout_loss(model, tokenizer: PreTrainedTokenizerBase, rows: list[dict], recipe: Recipe,
                 batch_size: int, progress: Progress | None = None, label: str = "loss") -> float | None:
    """Mean cross-entropy per trained token (assistant turns, as `data.loss_on` says): the training loss, held out."""
    from qlora_kit.data import tokenize_row

    tokenized = [tokenize_row(tokenizer, row, recipe.data.loss_on) for row in rows]
    tokenized = [{k: v[: recipe.training.max_length] for k, v in t.items()} for t in tokenized]
    total, count = 0.0, 0
    for start in range(0, len(tokenized), batch_size):
        chunk = tokenized[start: start + batch_size]
        width = max(len(t["input_ids"]) for t in chunk)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([t["input_ids"] + [pad] * (width - len(t["input_ids"])) for t in chunk])
        attention = torch.tensor([[1] * len(t["input_ids"]) + [0] * (width - len(t["input_ids"])) for t in chunk])
        mask = torch.tensor([t["assistant_masks"] + [0] * (width - len(t["input_ids"])) for t in chunk])
        labels = ids.masked_fill(mask == 0, -100)
        logits = model(input_ids=ids.to(model.device), attention_mask=attention.to(model.device)).logits.float()
        shifted = labels[:, 1:].to(logits.device)
        total += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                                   ignore_index=-100, reduction="sum").item()
        count += int((shifted != -100).sum())
        if progress is not None:
            progress.step(label)
    return total / count if count else None


def score_model(model, tokenizer: PreTrainedTokenizerBase, rows: list[dict], recipe: Recipe, stop_ids: list[int],
                max_samples: int, max_new_tokens: int, batch_size: int, progress: Progress | None = None,
                name: str = "model") -> EvalResult:
    loss = heldout_loss(model, tokenizer, rows, recipe, batch_size, progress, f"{name} loss")
    conversations = [r["messages"] for r in rows if "messages" in r][:max_samples]
    scores: dict[str, float] = {}
    examples: list[dict[str, str]] = []
    if conversations:
        prompts = [c[:-1] for c in conversations]
        references = [c[-1]["content"] for c in conversations]
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, stop_ids, progress,
                                   f"{name} generation")
        for metric in METRICS:
            scores[metric] = sum(matches(a, r, metric) for a, r in zip(answers, references, strict=True)) / len(answers)
        examples = [{"prompt": p[-1]["content"], "reference": r, "answer": a}
                    for p, r, a in zip(prompts[:3], references[:3], answers[:3], strict=False)]
    perplexity = math.exp(min(loss, 700)) if loss is not None else None
    return EvalResult(loss, perplexity, scores, examples)


def batch_count(rows: int, batch_size: int) -> int:
    return -(-rows // batch_size)


def evaluate_run(run_dir: str | Path, data_file: str | None = None, max_samples: int | None = None,
                 max_new_tokens: int | None = None, batch_size: int | None = None, include_base: bool = True) -> dict:
    """Score the run's adapter and (with the adapter disabled) its base on the same rows; writes <run>/eval.json."""
    recipe = read_run_recipe(run_dir)
    if recipe.method == "grpo":
        raise QloraKitError(f"{run_dir}: a GRPO run has no reference answers to score; its held-out rewards before "
                            "and after training are in summary.json (`generation`) and the run report")
    rows, described = heldout_rows(recipe, data_file)  # before loading weights: a missing split fails fast
    trained = load_trained_model(run_dir)
    section = recipe.evaluation
    settings = {"max_samples": max_samples or section.max_samples,
                "max_new_tokens": max_new_tokens or section.max_new_tokens,
                "batch_size": batch_size or section.batch_size}
    batches = batch_count(len(rows), settings["batch_size"]) + batch_count(
        min(settings["max_samples"], sum("messages" in r for r in rows)), settings["batch_size"])
    models = 2 if include_base else 1
    progress = Progress(batches * models, "eval")
    log.info("eval: %d rows, %d batches of %d for %s", len(rows), batches * models, settings["batch_size"],
             "the adapter and the base" if include_base else "the adapter")
    args = (trained.tokenizer, rows, recipe, trained.stop_ids, settings["max_samples"], settings["max_new_tokens"],
            settings["batch_size"], progress)
    results = {"adapter": score_model(trained.model, *args, name="adapter")}
    if include_base:
        with trained.model.disable_adapter():
            results["base"] = score_model(trained.model, *args, name="base")
    report = {"data": described, "rows": len(rows),
              "generated_rows": min(settings["max_samples"], sum("messages" in r for r in rows)),
              **settings, "results": {name: asdict(result) for name, result in results.items()}}
    write_atomically(Path(run_dir) / "eval.json", json.dumps(report, indent=2) + "\n")
    return report
