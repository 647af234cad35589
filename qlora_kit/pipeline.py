"""The training pipeline, top to bottom: recipe -> run folder -> tokenizer -> data -> model -> speed plan -> trainer ->
train -> save -> evaluate -> export. Every phase is one call into the module that owns it."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from accelerate import PartialState
from transformers import set_seed

from qlora_kit.data import build_datasets, longest_packed_pair, longest_training_row, varying_batch_lengths
from qlora_kit.evaluate import (
    GenerationScore,
    evaluate_generation,
    evaluate_preferences,
    evaluate_rewards,
    format_comparison,
    format_preference_comparison,
)
from qlora_kit.export import merge_adapter
from qlora_kit.gguf import export_after_training
from qlora_kit.model import (
    base_model_folder,
    build_quantized_model,
    check_model_config,
    check_target_modules,
    end_of_turn_token_ids,
    load_tokenizer,
    resolve_dtype,
)
from qlora_kit.publish import check_push_settings, push_run
from qlora_kit.recipe import PAIRED_METHODS, Recipe
from qlora_kit.report import data_summary, write_report
from qlora_kit.rewards import build_rewards
from qlora_kit.rundir import RunFolder, open_run_folder, write_atomically
from qlora_kit.speed import Machine, decide_speed_plan
from qlora_kit.trainers import build_trainer, save_adapter, train_adapter

log = logging.getLogger("qlora_kit")


def run_training(recipe: Recipe) -> dict:
    """Train the recipe in its run folder (locked for the run); a run that fails before saving anything leaves things
    as they were."""
    check_push_settings(recipe)  # an upload at the end needs a token now, not after hours of training
    state = PartialState()
    with open_run_folder(recipe, state) as run:
        return train_in_run_folder(recipe, run, state)


def train_in_run_folder(recipe: Recipe, run: RunFolder, state: PartialState) -> dict:
    run_dir = run.path
    with state.main_process_first():
        folder = base_model_folder(recipe.model)
    check_model_config(recipe, folder)
    check_target_modules(recipe, folder)  # on the meta device: a name peft would skip or refuse, before the weights
    tokenizer = load_tokenizer(recipe, folder)
    with state.main_process_first():  # rank 0 fills the tokenised-data cache, the others read it
        data = build_datasets(recipe, tokenizer)

    compute_dtype = resolve_dtype(recipe.quantization.compute_dtype, "quantization.compute_dtype")
    log.info("compute dtype: %s", str(compute_dtype).removeprefix("torch."))
    set_seed(recipe.training.seed)  # LoRA's random init must not depend on what ran before in this process
    loading = time.perf_counter()
    model = build_quantized_model(recipe, folder, compute_dtype)
    model_load_seconds = time.perf_counter() - loading
    stop_ids = end_of_turn_token_ids(tokenizer, model.generation_config.eos_token_id)

    rewards = build_rewards(recipe) if recipe.method == "grpo" else None
    if rewards:
        model.generation_config.eos_token_id = stop_ids  # GRPO's completions end at the template's end of turn

    def score(model) -> GenerationScore:
        if rewards:
            return evaluate_rewards(model, tokenizer, data.eval_prompts, rewards, recipe.evaluation,
                                    recipe.grpo.max_completion_length, stop_ids)
        return evaluate_generation(model, tokenizer, data.eval_conversations, recipe.evaluation, stop_ids)

    score_generation = recipe.evaluation.metric != "none" and state.is_main_process
    if score_generation:
        # the model as training starts: the base (a fresh adapter adds nothing), or the base with model.adapter
        with model.disable_adapter() if recipe.model.adapter is None else contextlib.nullcontext():
            before = score(model)
        log.info("before training: %s = %s", before.metric,
                 f"{before.score:.3f}" if before.metric == "reward" else f"{100 * before.score:.1f}%")

    score_pairs = recipe.method in PAIRED_METHODS and data.eval is not None and state.is_main_process
    if score_pairs:
        pairs_before = evaluate_preferences(model, data.eval, tokenizer.pad_token_id, recipe.evaluation.batch_size)

    # decided with the weights loaded, right before the trainer: `auto` kept layers spend the GPU memory left now
    plan = decide_speed_plan(recipe, model.config, Machine.measure(), model.get_nb_trainable_parameters()[0],
                             longest_training_row(data, recipe), longest_packed_pair(data, recipe),
                             varying_batch_lengths(data, recipe))
    trainer = build_trainer(recipe, model, tokenizer, data, run_dir, compute_dtype, plan)
    if state.is_main_process:
        run.begin(recipe, state.num_processes)  # every check passed: the run's recipe.yaml is (re)written now
    summary = train_adapter(trainer, recipe, run_dir, plan)
    summary["trainable_parameters"], summary["total_parameters"] = model.get_nb_trainable_parameters()
    summary["model_load_seconds"] = round(model_load_seconds, 2)
    summary["data"] = data_summary(data.stats)
    save_adapter(trainer, tokenizer, run_dir, stop_ids)

    if score_pairs:
        pairs_after = evaluate_preferences(trainer.model, data.eval, tokenizer.pad_token_id,
                                           recipe.evaluation.batch_size)
        summary["preference"] = {"pairs": pairs_after.pairs, "before": asdict(pairs_before),
                                 "after": asdict(pairs_after)}
        beta = trainer.args.beta if recipe.method == "dpo" else None  # DPO's reward is beta x log-ratio to the start
        print(format_preference_comparison(pairs_before, pairs_after, beta), flush=True)
    if score_generation:
        after = score(trainer.model)
        summary["generation"] = {"before": asdict(before), "after": asdict(after)}
        print(format_comparison(before, after), flush=True)
    state.wait_for_everyone()
    if state.is_main_process:
        write_atomically(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        del trainer, model  # the 4-bit model goes before a merge loads the base in full precision
        export(recipe, run_dir)
        log.info("done: %s", run_dir)
    return summary


def export(recipe: Recipe, run_dir: Path) -> None:
    """What the recipe's `export` section asks for once the adapter is saved: merge, report, push."""
    if recipe.export.merge:
        merge_adapter(run_dir)
        export_after_training(run_dir, recipe.export)  # GGUF / Ollama from the merged model
    if recipe.export.report:
        write_report(run_dir)
    if recipe.export.push.repo_id:
        push = recipe.export.push
        push_run(run_dir, push.repo_id, merged=push.merged, private=push.private, base_model=push.base_model)

