"""Build trl's trainer and its config from the recipe, run it (resuming if asked), and save the adapter."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Literal

import torch
from transformers import TrainerCallback

from qlora_kit.data import PreparedData
from qlora_kit.recipe import DEFAULT_BETA, QloraKitError, Recipe, RecipeError, method_config_class
from qlora_kit.rewards import build_rewards
from qlora_kit.rundir import atomic_folder, find_resume_checkpoint, mark_checkpoint_complete, resume_command
from qlora_kit.speed import (
    ApplySpeedPlan,
    SpeedPlan,
    bend_trainer,
    modeling_module_restored,
    train_on_one_gpu_without_a_launcher,
)
from qlora_kit.speed.generation import merged_lora_weights
from qlora_kit.speed.patches import skip_padding_mask, upstream_changed
from qlora_kit.speed.plan import apply_checkpointing, checkpointing_was_reset
from qlora_kit.speed.shared_prefix import pairs_share_prefix

log = logging.getLogger("qlora_kit")

# -------------------------------------------------------------------------------------------------- trainer


class MetricsLog(TrainerCallback):
    """Appends every logged metric to <run>/metrics.jsonl and measures steady-state throughput and peak memory."""

    warmup_steps = 2  # the first steps pay for compilation, allocator growth and data loader start

    def __init__(self, path: Path) -> None:
        self.path = path
        self.marks: list[tuple[float, int, int]] = []  # (time, step, tokens seen)
        self.first_step_seconds: float | None = None  # from the process's start to the end of its first step

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append((time.perf_counter(), state.global_step, state.num_input_tokens_seen))
        if self.first_step_seconds is None:
            self.first_step_seconds = process_age()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def throughput(self) -> dict[str, float]:
        """Tokens/s over the steps after warm-up (all steps if there are too few)."""
        # marks[i] is the end of step i + 1, so timing from marks[warmup_steps - 1] leaves out exactly warmup_steps
        marks = self.marks[self.warmup_steps - 1:] if len(self.marks) > self.warmup_steps + 1 else self.marks
        stats: dict[str, float] = {}
        if len(marks) >= 2:
            (t0, s0, n0), (t1, s1, n1) = marks[0], marks[-1]
            stats = {"train_tokens_per_second": (n1 - n0) / (t1 - t0), "seconds_per_step": (t1 - t0) / (s1 - s0),
                     "measured_steps": s1 - s0, "step_seconds": step_durations(marks)}
        if torch.cuda.is_available():  # reserved: what the allocator held, CUDA graphs' pool included
            stats["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            stats["peak_reserved_gpu_memory_gib"] = torch.cuda.max_memory_reserved() / 2**30
        if self.first_step_seconds is not None:
            stats["first_step_seconds"] = round(self.first_step_seconds, 2)
        return stats


def process_age() -> float:
    """Seconds since this process started (the OS's start time, so imports count): time to first step counts
    from there, as a user waiting on `qlora-kit train` sees it."""
    import psutil  # accelerate's dependency

    return time.time() - psutil.Process().create_time()


def step_durations(marks: list[tuple]) -> list[float]:
    """Seconds of each step between consecutive (time, step, ...) marks: whether a slow run was slow throughout or
    stalled now and then."""
    return [round(t1 - t0, 4) for (t0, *_), (t1, *_) in itertools.pairwise(marks)]


class TrainingInterrupted(QloraKitError):
    """SIGTERM / Ctrl-C: a checkpoint was saved and the run can be resumed."""


class RunGuard(TrainerCallback):
    """Keeps a run recoverable: marks finished checkpoints, refuses a save the disk cannot hold, stops on NaN loss,
    and turns SIGTERM / Ctrl-C into "save a checkpoint, then stop"."""

    def __init__(self) -> None:
        self.stop_signal: str | None = None
        self.nan_step: int | None = None
        self.last_saved: str | None = None

    def request_stop(self, signum, frame) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.stop_signal = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint after this step, then stopping (again to abort at once)",
                    self.stop_signal)

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_signal is not None:
            control.should_save = True
            control.should_training_stop = True
        if control.should_save and state.is_world_process_zero:
            check_disk_space(Path(args.output_dir), kwargs.get("model"), state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = [logs.get(k) for k in ("loss", "grad_norm")] if logs else []
        if any(isinstance(v, float) and not math.isfinite(v) for v in values) and self.nan_step is None:
            self.nan_step = state.global_step
            control.should_save = False  # never checkpoint a diverged model
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            mark_checkpoint_complete(folder)
        self.last_saved = str(folder)


def check_disk_space(output_dir: Path, model, step: int) -> None:
    """Refuse to start a checkpoint the disk cannot hold: a half-written one is worse than none."""
    previous = [p for p in output_dir.glob("checkpoint-*") if p.is_dir()]
    if previous:
        needed = max(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in previous)
    else:  # adapter weights + two Adam moments, in fp32, plus the RNG/trainer state
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if model is not None else 0
        needed = trainable * 4 * 3 + (1 << 20)
    output_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(output_dir).free
    if free < needed * 1.2 + (16 << 20):
        raise QloraKitError(
            f"not enough disk space to save the checkpoint of step {step}: it needs about {needed / 2**20:,.0f} MiB "
            f"and {output_dir} has {free / 2**20:,.0f} MiB free. Free some space or lower "
            "training.save_total_limit, then resume with training.resume=auto")


def build_config(recipe: Recipe, run_dir: Path, compute_dtype: torch.dtype, has_eval: bool, plan: SpeedPlan):
    """The method's trl config (SFTConfig, DPOConfig, KTOConfig, ORPOConfig, CPOConfig or GRPOConfig): what every
    method shares (folders, schedule, precision, logging, saving) from `training` and the speed plan, then the
    method's own settings."""
    t = recipe.training
    common = dict(
        output_dir=str(run_dir / "checkpoints"),
        run_name=run_dir.name,
        max_length=t.max_length,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=plan.optimizer,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        seed=t.seed,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if has_eval and t.eval_steps else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=t.report_to or "none",
        bf16=compute_dtype is torch.bfloat16,
        fp16=compute_dtype is torch.float16,
        include_num_input_tokens_seen="non_padding",
        logging_nan_inf_filter=False,  # a NaN loss must reach RunGuard, not be averaged away
        use_liger_kernel=plan.liger_kernels,
    )
    if recipe.method == "grpo":
        # no max_length (prompt and completion have their own limits); GRPO counts its prompt and completion tokens
        # itself (trl's input count looks for input_ids, which its batches lack); trl's Liger GRPO loss is not yet
        # checked against its plain loss here
        common.pop("max_length")
        common.update(include_num_input_tokens_seen="no", use_liger_kernel=False)
        if recipe.speed.liger_kernels and torch.cuda.is_available():
            log.info("speed.liger_kernels: not applied to GRPO (its Liger loss is not compared with trl's plain one)")
    if recipe.method in ("orpo", "simpo") and plan.liger_kernels:
        # Liger's fused linear cross-entropy replaces the model's forward when training starts, which would drop the
        # fused LM head ChunkedPairLogProbs adds (as trl's DPOTrainer does for its own): its layer kernels only
        common["liger_kernel_config"] = {"fused_linear_cross_entropy": False}
    config_class = method_config_class(recipe.method)
    section = {"sft": "training", "grpo": "grpo"}.get(recipe.method, "preference")
    try:
        return config_class(**common, **method_settings(recipe))
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"{recipe.source}: {section}: {exc}") from None


def method_settings(recipe: Recipe) -> dict:
    """The config arguments only the recipe's method has, from `training` (sft) or `preference` (the others)."""
    method, p = recipe.method, recipe.preference
    if method == "sft":
        t = recipe.training
        padded = {"pad_to_multiple_of": t.max_length} if t.pad_to_max_length else {}  # rows never pass max_length
        return {"packing": t.packing, "padding_free": t.padding_free or t.packing, **padded, **t.sft_args}
    if method == "grpo":
        # trl samples all completions of an optimizer step (every prompt's num_generations together) in one
        # `generate` call: its defaults steps_per_generation = gradient_accumulation_steps and
        # generation_batch_size = the step's completions, kept as they are
        g = recipe.grpo
        return {"num_generations": g.num_generations, "max_completion_length": g.max_completion_length,
                "temperature": g.temperature, "top_p": g.top_p, "beta": g.beta, "loss_type": g.loss_type,
                "epsilon": g.epsilon, "epsilon_high": g.epsilon_high, "scale_rewards": g.scale_rewards,
                "reward_weights": [r.weight for r in g.rewards], **g.config_args}
    settings: dict = {"beta": DEFAULT_BETA[method] if p.beta is None else p.beta}
    if method == "dpo":
        settings.update(loss_type=p.loss_type or ["sigmoid"], loss_weights=p.loss_weights,
                        label_smoothing=p.label_smoothing, ld_alpha=p.ld_alpha)
    elif method == "kto":
        settings.update(loss_type=p.loss_type or "kto", desirable_weight=p.desirable_weight,
                        undesirable_weight=p.undesirable_weight)
    elif method == "simpo":  # SimPO is trl's CPO trainer with the simpo loss and no NLL term (cpo_alpha 0)
        settings.update(loss_type="simpo", simpo_gamma=p.gamma, cpo_alpha=p.cpo_alpha,
                        label_smoothing=p.label_smoothing)
    return {**settings, **p.config_args}


def build_trainer(recipe: Recipe, model, tokenizer, data: PreparedData, run_dir: Path, compute_dtype: torch.dtype,
                  plan: SpeedPlan):
    """trl's trainer for the recipe's method, with the speed plan (decided by the caller) applied when training
    starts."""
    args = build_config(recipe, run_dir, compute_dtype, has_eval=data.eval is not None, plan=plan)
    train_on_one_gpu_without_a_launcher(args)
    callbacks = [MetricsLog(run_dir / "metrics.jsonl"), RunGuard(), ApplySpeedPlan(plan)]
    trainer_class = method_trainer_class(recipe.method)
    if plan.generation_weights == "bf16" and not any("_generate_single_turn" in vars(parent)
                                                     for parent in trainer_class.__mro__[1:]):
        raise upstream_changed("speed.generation_weights: bf16: trl's GRPOTrainer has no _generate_single_turn")
    rewards = {"reward_funcs": build_rewards(recipe)} if recipe.method == "grpo" else {}
    before_trl = {} if plan.machine.under_fsdp else {name: p.detach().clone() for name, p in model.named_parameters()
                                                     if p.requires_grad and p.dtype == torch.float32}
    trainer = trainer_class(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                            processing_class=tokenizer, callbacks=callbacks, **rewards)
    if recipe.method in ("dpo", "kto", "grpo"):
        use_reference_adapter_only_for_a_start_adapter(trainer.model, recipe.model.adapter is not None)
    bend_trainer(trainer, plan.machine.under_fsdp, before_trl)
    if plan.skip_padding_mask:
        skip_padding_mask(trainer)
        log.info("speed.skip_padding_mask: SFT batches train without their attention mask (right-padded, padding "
                 "out of the loss)")
    return trainer


def method_trainer_class(method: str) -> type:
    """The trainer class of a method: trl's own, subclassed only to take the rows qlora_kit.data tokenized (the same
    chat template rendering and prompt tokens as SFT), to keep the speed levers' checkpointing choices and (pairs)
    to compute the loss where speed.shared_prefix applies."""
    if method == "sft":
        from trl import SFTTrainer
        return SFTTrainer
    return {"dpo": dpo_trainer_class, "kto": kto_trainer_class, "orpo": orpo_trainer_class,
            "simpo": simpo_trainer_class, "grpo": grpo_trainer_class}[method]()


def grpo_trainer_class() -> type:
    from trl import GRPOTrainer

    class QloraKitGRPOTrainer(KeepsCheckpointSettings, GRPOTrainer):
        """trl's GRPOTrainer as it is: prompts rendered with the tokenizer's (the recipe's) chat template, all
        completions of a step sampled in one `generate` call with the KV cache. Its generation and no-grad scoring
        pass switch checkpointing off and on again; KeepsCheckpointSettings restores the speed settings before the
        loss. With speed.generation_weights: bf16 each generate call runs on merged compute-dtype copies."""

        def _generate_single_turn(self, *args, **kwargs):
            # trl offers: generate on the training model, each decode step through every peft LoRA layer over 4-bit
            # weights (dequantize, matmul, adapter); or vLLM / continuous batching. Why not: launch- and dequantize-
            # bound; merged copies make it one matmul per projection. Internal touched: GRPOTrainer.
            # _generate_single_turn, super() inside merged_lora_weights (trl 1.16.0, transformers 5.17 / 5.24, peft
            # 0.21.2, bitsandbytes 0.50.2).
            plan = callback_of(self, ApplySpeedPlan).plan
            merging = plan.generation_weights == "bf16" and not (self.use_vllm or
                                                                  self.use_transformers_continuous_batching)
            mode = "train" if self.model.training else "eval"
            started = time.perf_counter()
            with contextlib.ExitStack() as stack:
                if merging:
                    merged = stack.enter_context(merged_lora_weights(self.accelerator.unwrap_model(self.model)))
                    if not self.merge_logged:
                        log.info("speed.generation_weights: bf16: %s", merged.describe())
                        self.merge_logged = True
                    self._metrics[mode]["generation/merge_seconds"].append(merged.seconds)
                result = super()._generate_single_turn(*args, **kwargs)
            # the whole call (merging included): completion ids come back as lists, so the GPU has finished
            self._metrics[mode]["generation/seconds"].append(time.perf_counter() - started)
            return result

        merge_logged = False

    return QloraKitGRPOTrainer


def dpo_trainer_class() -> type:
    from trl import DPOTrainer

    class QloraKitDPOTrainer(SharesPairPrefix, KeepsCheckpointSettings, DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # DPOTrainer tokenizes prompt/chosen/rejected itself; qlora_kit.data already wrote prompt_ids,
            # chosen_ids and rejected_ids, the columns trl's own tokenization ends with (trl 1.16).
            return dataset

    return QloraKitDPOTrainer


def kto_trainer_class() -> type:
    from trl import KTOTrainer

    class QloraKitKTOTrainer(KeepsCheckpointSettings, KTOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # KTOTrainer tokenizes prompt/completion itself, then adds the mismatched completions its KL estimate
            # reads. qlora_kit.data wrote prompt_ids, completion_ids and label; the KL column is built as trl 1.16's
            # _prepare_dataset builds it: completions rotated by one within each batch of the (sequential) sampler.
            if not self.calculate_KL:
                return dataset

            def add_kl_completion_ids(batch):
                batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                return batch

            return dataset.map(add_kl_completion_ids, batched=True, batch_size=args.per_device_train_batch_size)

    return QloraKitKTOTrainer


def pair_columns_for_trl_experimental(feature: dict) -> dict:
    """ORPO's and CPO's batch layout (trl 1.16 trl.experimental: prompt / chosen / rejected input ids, attention
    masks and labels with the prompt masked) from the token ids qlora_kit.data wrote."""
    prompt = list(feature["prompt_ids"])
    row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        answer = list(feature[f"{side}_ids"])
        row[f"{side}_input_ids"] = prompt + answer
        row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
        row[f"{side}_labels"] = [-100] * len(prompt) + answer
    return row


# The sequences a preference batch trains the policy on, by the attention-mask column that marks their tokens:
# trl.experimental ORPO / CPO batches (prompt + chosen, prompt + rejected); trl's own DPO and KTO batches carry
# input_ids / attention_mask and are counted by transformers itself.
PAIR_SEQUENCE_MASKS = ("chosen_attention_mask", "rejected_attention_mask")


class CountsPairTokens:
    """Tokens seen (summary.json's train_tokens_per_second, metrics.jsonl's num_input_tokens_seen) for batches that
    hold their sequences as chosen_* / rejected_* columns: every token of prompt + chosen and prompt + rejected, the
    count trl's DPO batch (both sequences in `input_ids`) gets from transformers."""

    def _track_num_input_tokens(self, inputs):
        # transformers offers include_num_input_tokens_seen, which reads inputs[model.main_input_name] and counts
        # nothing for trl.experimental's ORPO / CPO batches (no input_ids): Trainer._track_num_input_tokens is
        # overridden, super() for every batch that has input_ids (transformers 5.24, trl 1.16)
        if self.args.include_num_input_tokens_seen == "no" or "input_ids" in inputs:
            return super()._track_num_input_tokens(inputs)
        masks = [inputs[key] for key in PAIR_SEQUENCE_MASKS]
        if self.args.include_num_input_tokens_seen == "non_padding":
            tokens = sum(mask.sum() for mask in masks)
        else:
            tokens = sum(mask.numel() for mask in masks)
        tokens = torch.as_tensor(tokens, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()


def orpo_trainer_class() -> type:
    from trl.experimental.orpo import ORPOTrainer

    class QloraKitORPOTrainer(SharesPairPrefix, CountsPairTokens, ChunkedPairLogProbs, ORPOTrainer):
        def tokenize_row(self, feature, model=None):
            return pair_columns_for_trl_experimental(feature)

        def pair_log_prob_settings(self) -> PairLogProbSettings:
            # ORPO's NLL: cross-entropy over every attended token of the chosen rows, prompt included
            return PairLogProbSettings(padding_value=self.padding_value, nll="attended", average=True)

    return QloraKitORPOTrainer


def simpo_trainer_class() -> type:
    from trl.experimental.cpo import CPOTrainer

    class QloraKitCPOTrainer(SharesPairPrefix, CountsPairTokens, ChunkedPairLogProbs, CPOTrainer):
        def tokenize_row(self, feature, model=None):
            return pair_columns_for_trl_experimental(feature)

        def pair_log_prob_settings(self) -> PairLogProbSettings:
            # CPO's NLL (only with cpo_alpha != 0): cross-entropy over the chosen rows' labels (answers only)
            return PairLogProbSettings(padding_value=self.pad_token_id, nll="labels" if self.cpo_alpha else None,
                                       average=self.loss_type in ("ipo", "simpo"))

    return QloraKitCPOTrainer


@dataclasses.dataclass(frozen=True)
class PairLogProbSettings:
    """What trl's ORPO / CPO concatenated_forward computes from the logits: the input ids' padding value, which
    tokens its chosen NLL averages ("attended": input ids where attended, "labels": the answer labels, None: no NLL,
    a constant 0) and whether the per-row log-prob is the mean (True) or the sum over the answer labels."""

    padding_value: int
    nll: Literal["attended", "labels"] | None
    average: bool


class ChunkedPairLogProbs:
    """trl.experimental ORPO / CPO (simpo) without the [2B, L, vocab] logits: one forward through trl's fused LM head
    (`add_fused_lm_head`, the per-token log-probs trl's DPO and KTO take), from which `concatenated_forward` returns
    what trl's returns: the per-row log-probs of the answer labels (mean or sum as trl's get_batch_logps), the chosen
    NLL, the MoE aux loss. The two "logits" it returns feed only trl's logged `logits/chosen|rejected` means: they are
    the per-token vocabulary means over the scored tokens, so those two logged means leave out padding (and for CPO
    the prompt), as the shared-prefix path's already did; every other metric and the loss are trl's.
    Encoder-decoder models keep trl's path (qlora-kit loads causal LMs only). The trainer class says how trl reads
    the logits in `pair_log_prob_settings()`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not self.is_encoder_decoder:
            add_fused_lm_head_once(self.model)

    def concatenated_forward(self, model, batch: dict):
        # trl offers: concatenated_forward on the model's full logits [2B, L, vocab] (log_softmax and cross-entropy
        # over them). Why not: at vocab 128k and 2 x 1,536 tokens they are GiBs at the peak. Internal touched:
        # ORPOTrainer / CPOTrainer.concatenated_forward, concatenated_inputs and aux_loss_enabled (trl 1.16.0).
        if self.is_encoder_decoder:
            return super().concatenated_forward(model, batch)
        settings = self.pair_log_prob_settings()
        concatenated = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=settings.padding_value,
                                                device=self.accelerator.device)
        input_ids = concatenated["concatenated_input_ids"]
        attention_mask = concatenated["concatenated_attention_mask"]
        labels = concatenated["concatenated_labels"]
        chosen_rows = batch["chosen_labels"].shape[0]
        if settings.nll == "attended":
            scored = input_ids.masked_fill(attention_mask == 0, -100)
            answers = labels != -100
            if not torch.equal(scored[answers], labels[answers]):
                raise upstream_changed("trl's ORPO batch: answer labels that are not the row's own input ids")
        else:
            scored = labels  # nothing reads the prompt's log-probs
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
        outputs = model(input_ids, attention_mask=attention_mask, use_cache=False, labels=scored,
                        fused_lm_head=True, **extra)
        log_probs, mean_logits, scored_mask = outputs.log_probs, outputs.mean_logits, outputs.label_mask
        answer_mask = labels[:, 1:] != -100
        row_log_probs = (log_probs * answer_mask).sum(-1)
        if settings.average:
            row_log_probs = row_log_probs / answer_mask.sum(-1)
        if settings.nll is None:
            nll = torch.tensor(0.0).to(self.accelerator.device)
        else:  # nn.CrossEntropyLoss's mean over the tokens it does not ignore
            nll = -log_probs[:chosen_rows].sum() / scored_mask[:chosen_rows].sum()
        chosen_logits = mean_logits[:chosen_rows][scored_mask[:chosen_rows]]
        rejected_logits = mean_logits[chosen_rows:][scored_mask[chosen_rows:]]
        result = (row_log_probs[:chosen_rows], row_log_probs[chosen_rows:], chosen_logits, rejected_logits, nll)
        return (*result, outputs.aux_loss) if self.aux_loss_enabled else result


FUSED_HEAD_OUTPUTS = ("log_probs", "mean_logits")


def add_fused_lm_head_once(model) -> None:
    """trl's fused LM head on the causal LM under the PEFT wrapper (as trl's DPOTrainer adds it), once per model:
    `model(..., labels=..., fused_lm_head=True)` then returns per-token log-probs computed in tiles."""
    from peft import PeftModel
    from trl.trainer.utils import add_fused_lm_head

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if not base.__dict__.get("_qlora_kit_fused_lm_head", False):
        add_fused_lm_head(base, outputs=FUSED_HEAD_OUTPUTS)
        base._qlora_kit_fused_lm_head = True


class SharesPairPrefix:
    """The pair trainers (DPO, ORPO, CPO/SimPO) compute their loss inside `pairs_share_prefix()`: their [chosen;
    rejected] forwards (DPO's reference pass too) run each pair's common prefix once where the speed plan rebound
    the decoder (speed.shared_prefix), and unchanged where it did not."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with pairs_share_prefix():
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)


class KeepsCheckpointSettings:
    """trl's DPO and KTO trainers run the reference pass inside `disable_gradient_checkpointing`, which switches
    checkpointing back on for every layer with the default function afterwards: that would undo the speed plan's kept
    layers and its reentrant / offloaded checkpoint function after the first step. Each loss computation puts them
    back first (a look at two layers when nothing changed)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        applier = callback_of(self, ApplySpeedPlan)
        if applier is not None:
            restore_checkpoint_settings(self.accelerator.unwrap_model(model), applier.plan)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def restore_checkpoint_settings(model, plan: SpeedPlan) -> None:
    """Apply the plan's checkpointing again where `gradient_checkpointing_enable` reset it (idempotent)."""
    if checkpointing_was_reset(model, plan):
        apply_checkpointing(model, plan)


def use_reference_adapter_only_for_a_start_adapter(model, start_adapter: bool) -> None:
    """trl's DPO and KTO trainers (and GRPO's with grpo.beta > 0) copy a PEFT model's adapter into a frozen "ref"
    adapter for the reference pass.
    Continuing `model.adapter`, that copy is the reference (the same 4-bit base, no second model). A fresh adapter
    (B = 0) adds nothing to the base, so the copy is dropped and trl disables the adapter for the reference pass."""
    if start_adapter or "ref" not in model.peft_config:
        return
    model.delete_adapter("ref")
    model.set_adapter("default")


def callback_of(trainer, kind: type):
    return next((c for c in trainer.callback_handler.callbacks if isinstance(c, kind)), None)


def train_adapter(trainer, recipe: Recipe, run_dir: Path, plan: SpeedPlan) -> dict:
    """Train (resuming if asked), evaluate held-out loss, and return the run's summary metrics and speed plan."""
    guard = callback_of(trainer, RunGuard)
    previous = {sig: signal.signal(sig, guard.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with modeling_module_restored(trainer.model):
            result = trainer.train(resume_from_checkpoint=find_resume_checkpoint(recipe, run_dir))
    except torch.OutOfMemoryError as exc:
        kept = plan.kept_layers
        raise QloraKitError(
            "CUDA out of memory during training. " +
            (f"{kept} layers kept their activations: set speed.keep_activations_layers lower (0 recomputes every "
             "layer, the least memory). Or: " if kept else "") +
            "Lower training.batch_size (raise gradient_accumulation_steps to keep the global batch), lower "
            "training.max_length, keep training.gradient_checkpointing on, or turn on training.packing to stop paying "
            "for padding"
        ) from exc
    finally:
        callback_of(trainer, ApplySpeedPlan).restore_process_settings()  # an error skips the trainer's on_train_end
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if guard.nan_step is not None:
        kept = guard.last_saved or "none (no checkpoint was saved before it)"
        raise QloraKitError(f"the loss became NaN/inf by step {guard.nan_step}; training stopped and nothing was "
                            f"saved after it. Last good checkpoint: {kept}. Lower training.learning_rate, keep "
                            "training.max_grad_norm > 0, or check the data for empty/garbage rows")
    if guard.stop_signal is not None:
        raise TrainingInterrupted(f"stopped by {guard.stop_signal} at step {trainer.state.global_step}; checkpoint "
                                  f"saved in {guard.last_saved}. Resume with: {resume_command(recipe)}")
    summary = {"train_loss": mean_logged_loss(run_dir / "metrics.jsonl", result.training_loss),
               "global_step": result.global_step, **callback_of(trainer, MetricsLog).throughput(),
               "kept_activation_layers": plan.kept_layers, "speed_plan": plan.as_dict()}
    if trainer.eval_dataset is not None:
        summary["eval_loss"] = trainer.evaluate()["eval_loss"]
    return summary


def mean_logged_loss(metrics: Path, fallback: float) -> float:
    """Mean of the logged per-step losses over every session of the run (transformers' own figure counts only the
    last session's losses, divided by all steps, so it is wrong after a resume)."""
    by_step = {}
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                by_step[record["step"]] = record["loss"]  # a step re-run after a resume counts once
    return sum(by_step.values()) / len(by_step) if by_step else fallback


ADAPTER_MARKERS = ("lora_", "modules_to_save")


def gather_fsdp_adapter(trainer) -> dict[str, torch.Tensor]:
    """The adapter of an FSDP-sharded model as full tensors on rank 0 (empty on the other ranks).

    Trainer's FULL_STATE_DICT save wrote an empty adapter file with FSDP-QLoRA (transformers 5.17, accelerate 1.15),
    so the LoRA weights are gathered here, without copying the 4-bit base to the CPU as a full state dict would."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = trainer.model_wrapped
    with FSDP.summon_full_params(root, writeback=False, rank0_only=True, offload_to_cpu=True):
        if trainer.is_world_process_zero():
            return adapter_tensors(trainer.accelerator.unwrap_model(root))
    return {}


FSDP_WRAPPER_NAMES = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """LoRA (and modules_to_save) tensors under their state-dict names, found by walking the modules: inside FSDP's
    summon_full_params the gathered weights are plain tensor attributes, which named_parameters() does not list."""
    found = {}
    for name, module in model.named_modules():
        if next(module.children(), None) is not None or not any(marker in name for marker in ADAPTER_MARKERS):
            continue
        clean = ".".join(part for part in name.split(".") if part not in FSDP_WRAPPER_NAMES)
        for attribute in ("weight", "bias"):
            tensor = getattr(module, attribute, None)
            if isinstance(tensor, torch.Tensor):
                found[f"{clean}.{attribute}"] = tensor.detach().to("cpu", copy=True)
    return found


def write_peft_adapter(peft_model, adapter: dict[str, torch.Tensor], folder: Path) -> None:
    """What `PeftModel.save_pretrained` writes, from tensors gathered under FSDP.

    peft 0.21 picks the adapter's entries by module names, and FSDP's nested wrappers put `_fsdp_wrapped_module` in
    the middle of those names, so peft saves an empty file there. peft still writes the config; the weights are
    written here under the names peft gives them (its tuner's key mapping; DoRA magnitudes drop `.weight`, as peft's
    LoRA saver does). A CPU test compares the result with save_pretrained's own files."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from safetensors.torch import save_file

    name = peft_model.active_adapter
    peft_model.save_pretrained(str(folder), state_dict=adapter)  # adapter_config.json (+ README)
    tuner = PEFT_TYPE_TO_TUNER_MAPPING[peft_model.peft_config[name].peft_type]
    weights = {}
    for key, value in adapter.items():
        if f".{name}" in key:
            key = tuner._remove_adapter_name_from_key(key, name)
            key = key.removesuffix(".weight") if key.endswith("lora_magnitude_vector.weight") else key
            weights[key] = value.contiguous()
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def check_adapter_not_empty(folder: Path) -> None:
    """A saved adapter without weights would load as the untouched base model: fail loudly instead."""
    from safetensors import safe_open

    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as handle:
            if len(list(handle.keys())):
                return
    raise QloraKitError(f"saving the adapter wrote no LoRA weights to {weights}; the checkpoints in "
                        f"{folder.parent / 'checkpoints'} still hold the training state. Please report this with "
                        "the versions in recipe.yaml")


def save_adapter(trainer, tokenizer, run_dir: Path, stop_ids: list[int]) -> Path:
    """PEFT adapter + tokenizer in <run>/adapter, loadable by plain `PeftModel.from_pretrained`."""
    target = run_dir / "adapter"
    fsdp = trainer.is_fsdp_enabled
    adapter = gather_fsdp_adapter(trainer) if fsdp else None  # a collective: every rank takes part, rank 0 gets them
    if not trainer.is_world_process_zero():
        return target
    if "ref" in trainer.model.peft_config:  # trl's frozen reference copy (dpo, kto) is not trained
        trainer.model.delete_adapter("ref")
    with atomic_folder(target) as partial:
        if fsdp:
            write_peft_adapter(trainer.accelerator.unwrap_model(trainer.model_wrapped), adapter, partial)
        else:
            trainer.save_model(str(partial))  # writes on the main process only, no collective
        check_adapter_not_empty(partial)
        tokenizer.save_pretrained(str(partial))
        generation_config = trainer.model.generation_config
        generation_config.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
        generation_config.pad_token_id = tokenizer.pad_token_id
        generation_config.save_pretrained(str(partial))
    log.info("adapter saved to %s", target)
    return target
