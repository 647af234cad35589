"""Throughput and peak memory of qlora-kit's pipeline against plain transformers + bitsandbytes + peft + trl glue.

One command on the GPU machine. It builds randomly initialised models of real shapes (saved under --work; speed and
memory do not depend on weight values), a chat dataset whose rows are exactly --seq tokens long (so every
micro-batch is full length and every token is trained on), then for each shape:batch runs
  qlora-kit   `python -m qlora_kit train <generated recipe>`, the real CLI and pipeline;
  reference   the hand-glued script in `run_reference` below (BitsAndBytesConfig, prepare_model_for_kbit_training,
              LoraConfig, SFTTrainer) with the same settings and data,
each in its own process, so peak memory (torch.cuda.max_memory_allocated) never mixes. Tokens/s skip the first
two steps, as qlora-kit's MetricsLog does. A failing configuration (OOM, timeout) is recorded and the rest go on;
bench.json and bench.md are rewritten after every run, so a cut-off call still returns what finished.

The qlora-kit recipe keeps the reference's optimizer (paged AdamW 8-bit) and checkpoints every layer, as the
reference does; qlora-kit's defaults are `training.optimizer=auto` and `speed.keep_activations_layers=auto` (as many
layers keep their activations as fit on the GPU): `--variant defaults` runs them.

`--method dpo,orpo` trains preference rows instead (prompt seq/2 + chosen seq/4 + rejected seq/4 tokens, as chat
turns): qlora-kit with `method: dpo|orpo` against trl's DPOTrainer / ORPOTrainer given the same NF4 model and a
LoraConfig (DPO's reference = the adapter disabled). tokens/s counts prompt + chosen and prompt + rejected of every
pair (1.5 x seq), on both paths, per step. `--method grpo` samples completions of exactly seq/2 tokens
(min_new_tokens) for prompts of seq/2, `--generations` per prompt, batch = completions per step, rewarded by
bench_common.completion_chars; tokens/s is completion tokens per second of `generate` (every call timed, GPU synced),
s/step the whole optimizer step (qlora-kit's merge of the generation weights, speed.generation_weights: bf16, is
outside `generate`: it counts in s/step, and metrics.jsonl has it as generation/merge_seconds). One H200 call each
(after `source scripts/device_prelude.sh;`), about 4 and 6 min:

  python3 scripts/bench.py --method dpo,orpo --configs 8b:2 --seq 2048 --steps 10 --paths reference,qlora-kit \
      --variant same: --variant defaults --variant noshare:speed.shared_prefix=false --out $OUT --deadline 500 \
      --run-timeout 200
  python3 scripts/bench.py --method grpo --configs 8b:8 --generations 8 --seq 256 --steps 8 \
      --paths reference,qlora-kit --variant same: --variant defaults --variant nf4gen:speed.generation_weights=nf4 \
      --out $OUT --deadline 500 --run-timeout 200
  python scripts/bench.py --tiny --method dpo,orpo,grpo --generations 2 --out /tmp/bench   # CPU dry run, ~5 min

  python scripts/bench.py --out $OUT                          # 8b:2 and 1b:4, the reference numbers' settings
  python scripts/bench.py --configs 8b:2 --variant same: --variant defaults --variant auto:training.optimizer=auto \
      --variant nofuse:speed.fused_lora=false --profile qlora-kit:auto   # levers side by side with the reference
  python scripts/bench.py --configs 8b:8 --ref-sft-args '{"use_liger_kernel": true}'   # the reference's best
  python scripts/bench.py --configs 70b:1 --paths qlora-kit --steps 4 --override speed.offload_checkpoints=true
  python scripts/bench.py --configs 8b:1 --seq 350000 --steps 1 --paths qlora-kit --gpu-memory-gib 79 \
      --override speed.offload_checkpoints=true --override speed.mlp_chunk_tokens=32768   # long-context memory probe
  python scripts/bench.py --tiny --out /tmp/bench             # CPU dry run on a tiny shape, in about a minute
  python scripts/bench.py --tiny --configs tiny-qwen2.5:2,tiny-gemma-2:2 --out /tmp/bench   # other families on CPU

Every family in recipes/ has a shape built with its own config class (bench_common.SHAPES: 8b, mistral-7b,
qwen2.5-7b, qwen3-8b, gemma-2-9b, gemma-3-4b, phi-4-mini, smollm2-1.7b; tiny-FAMILY for CPU). Each device call
below fits in 9 minutes (a shape: ~30 s to build, ~30 s a run at 8 steps):

  source scripts/device_prelude.sh; python scripts/bench.py --configs qwen2.5-7b:2,mistral-7b:2,qwen3-8b:2 \
      --steps 8 --variant same: --variant defaults --deadline 480 --out $OUT/families1   # families, 1 of 2
  source scripts/device_prelude.sh; python scripts/bench.py --configs gemma-2-9b:2,gemma-3-4b:2,phi-4-mini:2,\
smollm2-1.7b:4 --steps 8 --variant same: --variant defaults --deadline 480 --out $OUT/families2   # 2 of 2
  source scripts/device_prelude.sh; python scripts/bench.py --configs qwen2.5-7b:2,8b:2 --steps 8 --paths qlora-kit \
      --variant defaults --variant same: --profile qlora-kit:defaults,qlora-kit:same --deadline 420 \
      --out $OUT/qwen_profile && python scripts/dequant_kernel_bench.py --shape qwen2.5-7b --shape 8b \
      --out $OUT/qwen_profile   # why Qwen2.5 gains less than Llama: kernel time by kind, host gaps, dequantize widths

unsloth side by side (`--paths qlora-kit,reference,unsloth`): `cmd_unsloth` runs unsloth's own recipe
(FastLanguageModel 4-bit, its "unsloth" offloaded checkpointing, adamw_8bit, its padding-free batches) on the same
model, data, LoRA, batch and schedule, `import unsloth` first in its own process. unsloth 2026.10.9 pins trl <= 1.15
and datasets < 5, so its packages live in a folder of their own (--unsloth-site, default /tmp/unsloth_site), first
on that process's PYTHONPATH only. Its wheels and the main set pass the 64 MiB one device call carries, so two
calls on a warm machine:
  here:    bash ../shared/gpu/fetch-wheels.sh; bash scripts/fetch_unsloth_wheels.sh      # .whl/ and .whl-unsloth/
  call 1:  carry [".whl"]          source scripts/device_prelude.sh            # main set into /tmp/site
  call 2:  carry [".whl-unsloth"]  source scripts/device_prelude_unsloth.sh; python3 scripts/bench.py --out $OUT \
               --configs 8b:2 --paths qlora-kit,reference,unsloth --variant defaults --variant least:speed.memory=least
unsloth runs offline (HF_HUB_OFFLINE, UNSLOTH_DISABLE_STATISTICS: no statistics download) and writes its compiled
modules to --work/unsloth_compiled_cache, kept between runs as Triton's cache is.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402  (scripts/ is not a package)
    LEARNING_RATE,
    LORA,
    ROOT,
    SCHEDULER,
    SEED,
    SHAPES,
    WARMUP,
    attention,
    chat_data,
    check_model_tokenizer,
    code_version,
    ensure_model,
    error_summary,
    fmt,
    preference_data,
    prompt_data,
    qlora_kit_recipe,
    read_environment,
    run_logged,
    run_measurements,
)

PATHS = ("qlora-kit", "reference", "unsloth")
WARMUP_STEPS_SKIPPED = 2  # as qlora_kit.trainers.MetricsLog.warmup_steps


# --------------------------------------------------------------------------- children: profiler, plain path, memory cap


KERNEL_KINDS = [  # (category, substrings of CUDA kernel names), first match wins
    ("Liger (Triton)", ("liger", "rms_norm", "swiglu", "_rope", "cross_entropy_kernel", "element_mul_kernel")),
    ("bitsandbytes dequantize", ("dequantize", "kdequant")),
    ("bitsandbytes optimizer", ("optimizer", "kpreconditionoptimizer", "koptimizer")),
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "matmul")),
    ("softmax / cross-entropy", ("softmax", "log_softmax", "nll_loss", "cross_entropy")),
    ("reductions", ("reduce",)),
    ("copies and casts", ("copy", "cast", "convert")),
]


def profile_callback(out_path: Path, first_step: int = 5, steps: int = 2):
    """torch.profiler over steps first_step..first_step+steps-1; writes kernel time by kind and the top kernels."""
    import torch
    from transformers import TrainerCallback

    class ProfileSteps(TrainerCallback):
        def __init__(self) -> None:
            self.profiler = None
            self.started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first_step - 1:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                    torch.cuda.synchronize()
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.start()
                self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is None or state.global_step != first_step - 1 + steps:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall_us = (time.perf_counter() - self.started) * 1e6
            self.profiler.stop()
            kernels = [e for e in self.profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            by_kind: dict[str, float] = collections.defaultdict(float)
            for event in kernels:
                name = event.name.lower()
                kind = next((k for k, keys in KERNEL_KINDS if any(key in name for key in keys)), "other kernels")
                by_kind[kind] += event.time_range.elapsed_us()
            busy = sum(by_kind.values())
            lines = [f"Profile of optimizer steps {first_step}..{first_step + steps - 1}: wall {wall_us / 1e3:.1f} ms, "
                     f"GPU kernels {busy / 1e3:.1f} ms ({100 * busy / wall_us:.1f}% of wall), "
                     f"{len(kernels)} kernel launches", "", "kernel time by kind:"]
            lines += [f"  {kind:28s} {us / 1e3:9.1f} ms  {100 * us / max(busy, 1):5.1f}%"
                      for kind, us in sorted(by_kind.items(), key=lambda item: -item[1])]
            sort_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            averages = self.profiler.key_averages()
            table = averages.table(sort_by=sort_key, row_limit=30, max_name_column_width=70)
            # where the host CPU's time goes: what to cut when the GPU waits on kernel launches
            host = averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
            idle = gpu_idle_report(self.profiler.events(), kernels) if kernels else ""
            out_path.write_text("\n".join(lines) + "\n\n" + table + "\n\nby host time:\n" + host + "\n" + idle)
            print("\n".join(lines), flush=True)
            self.profiler = None

    return ProfileSteps()


def gpu_idle_report(events, kernels, min_gap_us: float = 20.0, rows: int = 30) -> str:
    """Where the GPU sat idle between kernels, by what the host was running when each gap began.

    A gap starts when every launched kernel has finished; the host op open at that moment (innermost, on any thread:
    backward runs on autograd's own) is what the GPU waited on: a sync, Python between launches, an allocation.
    """
    import bisect

    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    gaps, busy_until = [], spans[0][1]
    for start, end in spans[1:]:
        if start - busy_until >= min_gap_us:
            gaps.append((busy_until, start - busy_until))
        busy_until = max(busy_until, end)
    host = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                  if e.device_type != kernels[0].device_type)
    starts = [h[0] for h in host]
    by_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for at, length in gaps:
        i = bisect.bisect_right(starts, at)
        open_ops = [h for h in host[max(0, i - 3000):i] if h[1] > at]  # ops running at the gap's start
        name = min(open_ops, key=lambda h: h[1] - h[0])[2] if open_ops else "(no host op: between steps)"
        by_op[name][0] += length
        by_op[name][1] += 1
    total = sum(length for _, length in gaps)
    lines = [f"\nGPU idle between kernels (gaps >= {min_gap_us:.0f} us): {total / 1e3:.1f} ms in {len(gaps)} gaps, "
             "by the host op open when each began:"]
    lines += [f"  {us / 1e3:8.1f} ms  {count:6d} gaps  {name[:90]}"
              for name, (us, count) in sorted(by_op.items(), key=lambda item: -item[1][0])[:rows]]
    return "\n".join(lines) + "\n"


def process_age() -> float:
    """Seconds since this process started (the OS's start time): what "time to first step" counts from."""
    import psutil

    return time.time() - psutil.Process().create_time()


def step_log_callback():
    """A TrainerCallback taking the same marks as qlora-kit's MetricsLog (step-end times, logged losses) and the
    time to the end of the first optimizer step. Built on call: the unsloth child imports transformers only after
    unsloth."""
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []
            self.losses: list[float] = []
            self.first_step_s: float | None = None

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), state.global_step))
            if self.first_step_s is None:
                self.first_step_s = round(process_age(), 1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepLog()


def step_measurements(steps, batch: int, row_lengths: set[int]) -> dict[str, Any]:
    """Tokens/s and step times from a StepLog, as the reference and unsloth children report them. Every row is
    exactly `seq` tokens (the caller reads them back from the trainer's dataset), so a step trains batch * seq
    tokens; timing starts at the end of the last warm-up step, as qlora-kit's MetricsLog does."""
    marks = steps.marks[WARMUP_STEPS_SKIPPED - 1:]  # from the end of the last skipped step
    (t0, s0), (t1, s1) = (marks[0], marks[-1]) if len(marks) >= 2 else ((0.0, 0), (0.0, 0))
    tokens_per_step = batch * max(row_lengths)
    # as qlora_kit.trainers.step_durations, which the unsloth child must not import (trl 1.15 is loaded there)
    durations = [round(b[0] - a[0], 4) for a, b in itertools.pairwise(marks)]
    return {"tokens_per_second": tokens_per_step * (s1 - s0) / (t1 - t0) if s1 > s0 else None,
            "seconds_per_step": (t1 - t0) / (s1 - s0) if s1 > s0 else None, "measured_steps": s1 - s0,
            "step_seconds": durations, "losses": steps.losses, "row_tokens": sorted(row_lengths),
            "first_step_s": steps.first_step_s}


def seed_trainer_args(spec: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """The seed recipe's trainer settings every plain path shares (SFT, DPO, ORPO, GRPO)."""
    return dict(output_dir=spec["output_dir"], per_device_train_batch_size=spec["batch"], gradient_checkpointing=True,
                optim=spec["optimizer"], bf16=cuda, max_steps=spec["steps"], learning_rate=LEARNING_RATE,
                lr_scheduler_type=SCHEDULER, warmup_steps=WARMUP, seed=SEED, logging_steps=1, report_to="none")


def plain_4bit_model(spec: dict[str, Any]):
    """(tokenizer, prepared NF4 model, LoraConfig, whether on CUDA) as the bitsandbytes / peft docs glue them."""
    import torch
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], quantization_config=bnb, dtype=dtype,
                                                 attn_implementation=spec["attention"],
                                                 device_map={"": 0 if cuda else "cpu"})
    model = prepare_model_for_kbit_training(model)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    return tokenizer, model, lora, cuda


def reserved_peak_gib() -> float | None:
    """torch.cuda.max_memory_reserved in GiB: what the allocator held at most. The peak column is allocated memory;
    CUDA graphs (speed.cuda_graphs) keep their pool's freed blocks for their replays, which allocated memory does
    not count, so graph runs are compared on this one."""
    import torch

    return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None


def cmd_reference(spec_path: str) -> None:
    """The plain path: transformers + bitsandbytes + peft + trl glued by hand, as their docs show."""
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("method", "sft") == "grpo":
        return cmd_reference_grpo(spec)
    if spec.get("method", "sft") != "sft":
        return cmd_reference_preference(spec)
    import torch
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    tokenizer, model, lora, cuda = plain_4bit_model(spec)
    model_loaded = time.perf_counter()
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    args = SFTConfig(**seed_trainer_args(spec, cuda), max_length=spec["seq"], **spec.get("sft_args", {}))

    steps = step_log_callback()
    callbacks = [steps] + ([profile_callback(Path(spec["profile_out"]))] if spec.get("profile_out") else [])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora, callbacks=callbacks)
    loaded = time.perf_counter()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    row_lengths = {len(ids) for ids in trainer.train_dataset["input_ids"]}
    print("BENCH_JSON " + json.dumps({
        **step_measurements(steps, spec["batch"], row_lengths), "peak_gpu_memory_gib": peak,
        "peak_reserved_gib": reserved_peak_gib(),
        "setup_s": round(loaded - start, 1), "model_load_s": round(model_loaded - start, 1),
        "trainable_parameters": trainer.model.get_nb_trainable_parameters()[0]}))


PAIR_MASKS = ("chosen_attention_mask", "rejected_attention_mask")


def pair_batch_tokens(batch: dict[str, Any]) -> int:
    """Tokens of prompt + chosen and prompt + rejected in a collated batch: trl's DPO batch stacks both sequences in
    attention_mask, trl.experimental's ORPO batch keeps chosen_* / rejected_* (qlora_kit.trainers counts the same)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(sum(batch[key].sum() for key in PAIR_MASKS))


def counting_collator(collate, counts: list[int]):
    """`collate`, appending each batch's pair tokens to `counts`: counts[i] is micro-batch i + 1's (the loader may
    collate one batch ahead, so counts are read by step number, never by time)."""
    def collate_and_count(features):
        batch = collate(features)
        counts.append(pair_batch_tokens(batch))
        return batch

    return collate_and_count


def timed_marks(marks: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """The step-end marks tokens/s and s/step are timed over: from the end of the last skipped warm-up step."""
    return marks[WARMUP_STEPS_SKIPPED - 1:] if len(marks) > WARMUP_STEPS_SKIPPED + 1 else marks


def cmd_reference_preference(spec: dict[str, Any]) -> None:
    """The plain DPO / ORPO path: trl's trainer on the NF4 model with a LoraConfig (DPO's reference is the same model
    with the adapter disabled, trl's default for a peft_config), trl tokenizing the chat rows itself; max_length
    holds a whole row, so nothing is truncated and both paths train the same tokens."""
    import torch
    from datasets import load_dataset

    if spec["method"] == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer
        lengths = {"max_length": spec["seq"]}
    else:
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
        lengths = {"max_length": spec["seq"], "max_completion_length": spec["seq"]}
    start = time.perf_counter()
    tokenizer, model, lora, cuda = plain_4bit_model(spec)
    model_loaded = time.perf_counter()
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    args = Config(**seed_trainer_args(spec, cuda), **lengths)
    steps = step_log_callback()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
                      callbacks=[steps])
    counts: list[int] = []
    trainer.data_collator = counting_collator(trainer.data_collator, counts)
    loaded = time.perf_counter()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    from qlora_kit.trainers import step_durations  # after training: the plain path imports nothing of qlora-kit's

    marks = timed_marks(steps.marks)
    (t0, s0), (t1, s1) = marks[0], marks[-1]
    tokens_per_step = counts[:steps.marks[-1][1]]  # one micro-batch per step
    print("BENCH_JSON " + json.dumps({
        "tokens_per_second": sum(tokens_per_step[s0:s1]) / (t1 - t0) if s1 > s0 else None,
        "seconds_per_step": (t1 - t0) / (s1 - s0) if s1 > s0 else None, "measured_steps": s1 - s0,
        "step_seconds": step_durations(marks), "peak_gpu_memory_gib": peak,
        "peak_reserved_gib": reserved_peak_gib(), "losses": steps.losses,
        "tokens_per_step": tokens_per_step, "setup_s": round(loaded - start, 1),
        "model_load_s": round(model_loaded - start, 1), "first_step_s": steps.first_step_s,
        "trainable_parameters": trainer.model.get_nb_trainable_parameters()[0]}))


class GenerationTimer:
    """Seconds and new tokens of every `generate` call in this process (GenerationMixin.generate, which peft's and
    trl's generate reach), with the GPU synchronised on both sides: what the GRPO bench times on both paths."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, int]] = []

    def install(self) -> None:
        import torch
        from transformers.generation.utils import GenerationMixin

        generate = GenerationMixin.generate

        def timed_generate(model, *args, **kwargs):
            prompt = kwargs.get("input_ids", args[0] if args else None)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started = time.perf_counter()
            out = generate(model, *args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            self.calls.append((time.perf_counter() - started,
                               sequences.numel() - (prompt.numel() if prompt is not None else 0)))
            return out

        GenerationMixin.generate = timed_generate

    def measurements(self) -> dict[str, Any]:
        """Generated tokens/s over the calls after the warm-up steps' (one call per optimizer step in GRPO)."""
        timed = self.calls[WARMUP_STEPS_SKIPPED:] if len(self.calls) > WARMUP_STEPS_SKIPPED else self.calls
        seconds = sum(t for t, _ in timed)
        return {"generated_tokens_per_second": sum(n for _, n in timed) / seconds if seconds else None,
                "generation_seconds": [round(t, 4) for t, _ in self.calls],
                "generated_tokens": [n for _, n in self.calls],
                "generation_seconds_per_step": statistics.median(t for t, _ in timed) if timed else None}


def cmd_reference_grpo(spec: dict[str, Any]) -> None:
    """The plain GRPO path: trl's GRPOTrainer on the NF4 model with a LoraConfig, the bench reward, completions of
    a fixed length (min_new_tokens = max_completion_length), generation timed by GenerationTimer."""
    import torch
    from bench_common import completion_chars
    from datasets import load_dataset
    from trl import GRPOConfig, GRPOTrainer

    timer = GenerationTimer()
    timer.install()
    start = time.perf_counter()
    tokenizer, model, lora, cuda = plain_4bit_model(spec)
    model_loaded = time.perf_counter()
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    args = GRPOConfig(**seed_trainer_args(spec, cuda), **spec["grpo"],
                      generation_kwargs={"min_new_tokens": spec["grpo"]["max_completion_length"]})
    steps = step_log_callback()
    trainer = GRPOTrainer(model=model, reward_funcs=[completion_chars], args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora, callbacks=[steps])
    loaded = time.perf_counter()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    from qlora_kit.trainers import step_durations  # after training: the plain path imports nothing of qlora-kit's

    marks = timed_marks(steps.marks)
    (t0, s0), (t1, s1) = marks[0], marks[-1]
    print("BENCH_JSON " + json.dumps({
        **timer.measurements(), "seconds_per_step": (t1 - t0) / (s1 - s0) if s1 > s0 else None,
        "measured_steps": s1 - s0, "step_seconds": step_durations(marks), "peak_gpu_memory_gib": peak,
        "peak_reserved_gib": reserved_peak_gib(),
        "losses": steps.losses, "setup_s": round(loaded - start, 1),
        "model_load_s": round(model_loaded - start, 1), "first_step_s": steps.first_step_s,
        "trainable_parameters": trainer.model.get_nb_trainable_parameters()[0]}))


def cmd_timed(out_path: str, *argv: str) -> None:
    """`python ARGV...` (qlora-kit's CLI) with GenerationTimer installed; its measurements go to out_path."""
    timer = GenerationTimer()
    timer.install()
    try:
        run_python(list(argv))
    finally:
        Path(out_path).write_text(json.dumps(timer.measurements()))


# ------------------------------------------------------------------------------------------------ unsloth, side by side

UNSLOTH_SITE = Path("/tmp/unsloth_site")  # where scripts/device_prelude_unsloth.sh installs unsloth's wheels


def unsloth_site_problem(site: Path) -> str | None:
    """Why `site` cannot run the unsloth path (one line saying how to install it), or None."""
    if (site / "unsloth" / "__init__.py").is_file() and (site / "unsloth_zoo" / "__init__.py").is_file():
        return None
    return (f"--paths unsloth: no unsloth in {site} (--unsloth-site). Here: bash scripts/fetch_unsloth_wheels.sh; on "
            "the GPU machine, in a call of its own after the one that ran `source scripts/device_prelude.sh`: carry "
            "[.whl-unsloth] and start with `source scripts/device_prelude_unsloth.sh`")


def unsloth_environment(site: Path, work: Path, environ: dict[str, str]) -> dict[str, str]:
    """The unsloth child's environment: its own site first on PYTHONPATH (trl 1.15 and datasets 4.8 there shadow
    the main set's for this process only), offline, no statistics download, its compiled modules under --work."""
    python_path = os.pathsep.join([str(site.resolve()), *filter(None, [environ.get("PYTHONPATH")])])
    return {**environ, "PYTHONPATH": python_path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_ENABLE_HF_TRANSFER": "0",
            "UNSLOTH_COMPILE_LOCATION": str((work / "unsloth_compiled_cache").resolve())}


def unsloth_spec(base: dict[str, Any], model: Path, data: Path, work: Path) -> dict[str, Any]:
    """What the unsloth child trains: the other paths' model, data, LoRA, batch, steps and schedule, with unsloth's
    own recommended memory settings (its offloaded checkpointing, 8-bit AdamW)."""
    shape, seq, batch = base["shape"], base["seq"], base["batch"]
    return {"model": str(model.resolve()), "data": str(data.resolve()), "seq": seq, "batch": batch,
            "steps": base["steps"], "work": str(work.resolve()),
            "output_dir": str((work / "runs" / f"unsloth_{shape}_s{seq}_b{batch}").resolve()),
            "lora": {"r": LORA["r"], "lora_alpha": LORA["alpha"], "lora_dropout": LORA["dropout"], "bias": "none",
                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     "use_gradient_checkpointing": "unsloth", "random_state": SEED},
            "sft": {"per_device_train_batch_size": batch, "max_steps": base["steps"], "learning_rate": LEARNING_RATE,
                    "lr_scheduler_type": SCHEDULER, "warmup_steps": WARMUP, "seed": SEED, "optim": "adamw_8bit",
                    "bf16": True, "max_length": seq, "logging_steps": 1, "report_to": "none"}}


def cmd_unsloth(spec_path: str) -> None:
    """unsloth's own recipe (FastLanguageModel + trl's SFTTrainer as its notebooks show) on the same model and data;
    `import unsloth` comes first, before transformers, trl and peft, so its patches apply."""
    spec = json.loads(Path(spec_path).read_text())
    os.chdir(spec["work"])  # unsloth writes temporary folders under the working directory
    import unsloth  # must precede transformers / trl / peft
    from unsloth import FastLanguageModel

    # isort: split
    import torch
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(spec["model"], max_seq_length=spec["seq"],
                                                         load_in_4bit=True, dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(model, **spec["lora"])
    model_loaded = time.perf_counter()
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    steps = step_log_callback()
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, callbacks=[steps],
                         args=SFTConfig(output_dir=spec["output_dir"], **spec["sft"]))
    loaded = time.perf_counter()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30

    from importlib.metadata import version

    row_lengths = {len(ids) for ids in trainer.train_dataset["input_ids"]}
    print("BENCH_JSON " + json.dumps({
        **step_measurements(steps, spec["batch"], row_lengths), "peak_gpu_memory_gib": peak,
        "peak_reserved_gib": reserved_peak_gib(),
        "setup_s": round(loaded - start, 1), "model_load_s": round(model_loaded - start, 1),
        "trainable_parameters": model.get_nb_trainable_parameters()[0],
        "padding_free": getattr(trainer.args, "padding_free", None),
        "versions": {name: version(name) for name in ("unsloth", "unsloth_zoo", "trl", "datasets", "transformers")},
        "unsloth_from": str(Path(unsloth.__file__).parent.parent)}))


def unsloth_command(spec_path: Path) -> list[str]:
    return capped([sys.executable, __file__, "unsloth", str(spec_path)])


def run_unsloth(base: dict[str, Any], model: Path, data: Path, work: Path, site: Path, timeout: float
                ) -> dict[str, Any]:
    """One unsloth run in its own process (see cmd_unsloth); a failure is recorded like the other paths'."""
    shape, seq, batch = base["shape"], base["seq"], base["batch"]
    spec_path = work / f"unsloth_{shape}_s{seq}_b{batch}.json"
    spec_path.write_text(json.dumps(unsloth_spec(base, model, data, work), indent=2))
    status, result, tail, seconds = run_logged(unsloth_command(spec_path), timeout, f"unsloth {shape} b{batch}",
                                               env=unsloth_environment(site, work, dict(os.environ)))
    record = {**base, "path": "unsloth", "wall_s": round(seconds, 1)}
    if status != 0 or "tokens_per_second" not in result:
        return {**record, "error": error_summary(status, tail), "log_tail": tail[-15:]}
    return {**record, **result, "kept_activation_layers": 0, "error": None}  # its checkpointing covers every layer


GPU_MEMORY_CAP_GIB: float | None = None  # --gpu-memory-gib: children see a GPU this big (80 GB claims on an H200)


def capped(command: list[str]) -> list[str]:
    """The same child command, run under torch.cuda.set_per_process_memory_fraction when --gpu-memory-gib is set."""
    if GPU_MEMORY_CAP_GIB is None:
        return command
    return [sys.executable, __file__, "capped", str(GPU_MEMORY_CAP_GIB), *command[1:]]


def cmd_capped(gib: str, *argv: str) -> None:
    """Cap this process's GPU memory at `gib` GiB, then run `python ARGV...` (a module with -m, else a script)."""
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(gib) / total))
        print(f"GPU memory capped at {float(gib):.1f} of {total:.1f} GiB", flush=True)
        if os.environ.get("BENCH_SYNC_DEBUG") == "1":
            torch.cuda.set_sync_debug_mode("warn")
    else:
        print("no GPU: --gpu-memory-gib ignored", flush=True)
    run_python(list(argv))


def run_python(argv: list[str]) -> None:
    """What `python ARGV...` runs (a module with -m, else a script), in this process."""
    import runpy

    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


# -------------------------------------------------------------------------------------------------- orchestrator


def profile_path(out: Path, shape: str, batch: int, path: str) -> Path | None:
    """Where a profiled run ("profile reference", "profile qlora-kit:NAME") writes its table; None if not profiled."""
    if not path.startswith("profile "):
        return None
    name = path.removeprefix("profile ").replace(":", "_")
    return out / f"profile_{shape}_b{batch}_{name}.txt"


def cmd_profile_qlora_kit(recipe_path: str, out_path: str, *overrides: str) -> None:
    """`qlora-kit train` in this process with the profiler callback added to its trainer."""
    sys.path.insert(0, str(ROOT))
    import qlora_kit.pipeline
    from qlora_kit.pipeline import run_training
    from qlora_kit.recipe import load_recipe

    build_trainer = qlora_kit.pipeline.build_trainer

    def build_profiled_trainer(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        trainer.add_callback(profile_callback(Path(out_path)))
        return trainer

    qlora_kit.pipeline.build_trainer = build_profiled_trainer
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_training(load_recipe(recipe_path, list(overrides)))


def unpinned(overrides: list[str]) -> list[str]:
    """A variant that sets speed.memory runs what a recipe with that key gets: the keys the bench pins to the plain
    path's settings (PINNED_TO_PLAIN) go back to qlora-kit's defaults unless the variant sets them. The pin of the kept
    layers to 0 would contradict speed.memory (qlora-kit refuses that recipe), and the pinned paged 8-bit AdamW, which
    speed.memory picks itself only when the target needs it, cost a matched DPO run a fifth of its step."""
    keys = {o.partition("=")[0] for o in overrides}
    if "speed.memory" not in keys:
        return overrides
    return [*overrides, *(o for o in qlora_kit_defaults() if o.partition("=")[0] not in keys)]


def matched_to_reference(overrides: list[str], reference_peak_gib: float | None) -> list[str]:
    """`speed.memory=reference`: the memory target is the plain path's peak for the same shape and method, measured
    earlier in this call (the issue's "at no more than the plain path's peak memory"), floored to 0.01 GiB."""
    if "speed.memory=reference" not in overrides:
        return overrides
    if not reference_peak_gib:
        raise RuntimeError("speed.memory=reference needs a finished reference run of this shape and method earlier in "
                           "the call: --paths reference,qlora-kit (the reference first)")
    return [f"speed.memory={int(reference_peak_gib * 100) / 100:g}" if o == "speed.memory=reference" else o
            for o in overrides]


def run_qlora_kit(base: dict[str, Any], model: Path, data: Path, work: Path, gpu: bool, overrides: list[str],
                  timeout: float, label: str = "qlora-kit", profile_out: Path | None = None) -> dict[str, Any]:
    import yaml

    overrides = unpinned(overrides)
    shape, seq, batch, steps, method = base["shape"], base["seq"], base["batch"], base["steps"], base["method"]
    recipe = method_recipe(qlora_kit_recipe(model, data, work, shape, seq, batch, steps, gpu), base)
    name = f"{shape}_s{seq}_b{batch}" if method == "sft" else f"{method}_{shape}_s{seq}_b{batch}"
    recipe_path = work / f"recipe_{name}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_dir = work / "runs" / recipe["training"]["run_name"]
    generation_out = work / f"generation_{name}.json"
    generation_out.unlink(missing_ok=True)
    command = ([sys.executable, __file__, "profile-qlora-kit", str(recipe_path), str(profile_out)] if profile_out
               else [sys.executable, "-m", "qlora_kit", "train", str(recipe_path)])
    if method == "grpo":  # qlora-kit's CLI with every `generate` timed, as on the plain path
        command[1:1] = [__file__, "timed", str(generation_out)]
    status, _, tail, seconds = run_logged(capped(command + overrides), timeout, f"{label} {method} {shape} b{batch}")
    record = {**base, "path": label, "overrides": overrides, "wall_s": round(seconds, 1)}
    summary_path = run_dir / "summary.json"
    if status != 0 or not summary_path.is_file():
        return {**record, "error": error_summary(status, tail), "log_tail": tail[-15:]}
    record.update(method_measurements(run_dir, method, generation_out))
    try:  # qlora-kit's own config-only estimate, to see how close it lands
        from qlora_kit.memory import estimate_training_memory
        from qlora_kit.recipe import load_recipe

        estimate = round(estimate_training_memory(load_recipe(recipe_path, overrides), str(model))["total"], 2)
    except Exception as exc:  # the estimate is a side note; never lose a measurement over it
        estimate = f"unavailable: {exc!r:.200}"
    return {**record, "estimated_peak_gib": estimate, "error": None}


def run_reference(base: dict[str, Any], model: Path, data: Path, work: Path, gpu: bool, sft_args: dict[str, Any],
                  timeout: float, profile_out: Path | None = None) -> dict[str, Any]:
    shape, seq, batch, method = base["shape"], base["seq"], base["batch"], base["method"]
    name = f"{shape}_s{seq}_b{batch}" if method == "sft" else f"{method}_{shape}_s{seq}_b{batch}"
    spec = {"model": str(model), "data": str(data), "seq": seq, "batch": batch, "steps": base["steps"],
            "attention": attention(shape),
            "optimizer": "paged_adamw_8bit" if gpu else "adamw_torch", "sft_args": sft_args,
            "output_dir": str(work / "runs" / f"reference_{name}"),
            "profile_out": str(profile_out) if profile_out else None, "method": method}
    if method == "grpo":
        spec["grpo"] = grpo_settings(base)
    spec_path = work / f"reference_{name}.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    status, result, tail, seconds = run_logged(capped([sys.executable, __file__, "reference", str(spec_path)]),
                                               timeout, f"reference {method} {shape} b{batch}")
    record = {**base, "path": "profile reference" if profile_out else "reference", "sft_args": sft_args,
              "wall_s": round(seconds, 1)}
    if status != 0 or not result:
        return {**record, "error": error_summary(status, tail), "log_tail": tail[-15:]}
    if method == "grpo":
        result["tokens_per_second"] = result["generated_tokens_per_second"]
    return {**record, **result, "kept_activation_layers": 0, "error": None}  # the seed recipe checkpoints every layer


def grpo_settings(base: dict[str, Any]) -> dict[str, Any]:
    """The GRPO settings both paths train with (trl GRPOConfig names; qlora-kit's grpo section has the same keys).
    Prompts are half of --seq, completions the other half, always generated to full length."""
    return {"num_generations": base["generations"], "max_completion_length": base["seq"] - base["seq"] // 2,
            "temperature": 1.0, "top_p": 1.0, "beta": 0.0, "loss_type": "dapo", "epsilon": 0.2,
            "scale_rewards": "group"}


def method_recipe(recipe: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The bench recipe for `base["method"]`: preference rows train on their answers (loss_on is SFT's key), GRPO
    samples fixed-length completions and scores them with the plain path's reward function."""
    method = base["method"]
    if method == "sft":
        return recipe
    recipe["method"] = method
    recipe["training"]["run_name"] = f"{method}_{recipe['training']['run_name']}"
    del recipe["data"]["loss_on"]
    if method == "grpo":
        del recipe["training"]["max_length"]  # grpo.max_prompt_length + max_completion_length
        settings = grpo_settings(base)
        reward = f"{ROOT / 'scripts' / 'bench_common.py'}:completion_chars"
        recipe["grpo"] = {**settings, "rewards": [{"function": reward}], "max_prompt_length": base["seq"] // 2,
                          "config_args": {"generation_kwargs": {"min_new_tokens": settings["max_completion_length"]}}}
    return recipe


def method_measurements(run_dir: Path, method: str, generation_out: Path) -> dict[str, Any]:
    """A finished qlora-kit run's speed and memory (run_measurements), plus the tokens of each step for preference
    methods (metrics.jsonl's num_input_tokens_seen) and the generation timings for GRPO (GenerationTimer)."""
    measured = run_measurements(run_dir)
    if method in ("dpo", "orpo"):
        seen = [json.loads(line).get("num_input_tokens_seen") for line in
                (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        measured["tokens_per_step"] = [b - a for a, b in zip([0, *seen], seen, strict=False)]
    if method == "grpo":
        measured.update(json.loads(generation_out.read_text()))
        measured["tokens_per_second"] = measured["generated_tokens_per_second"]
    return measured


def triton_cache_entries() -> int:
    """Kernels in Triton's on-disk cache (one folder each; TRITON_CACHE_DIR, else ~/.triton/cache): a run that adds
    none compiled nothing, one that adds some paid for compiling them in its first steps."""
    folder = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return sum(1 for entry in folder.iterdir() if entry.is_dir()) if folder.is_dir() else 0


def same_config(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return ((a["shape"], a["seq"], a["batch"], a.get("method", "sft"))
            == (b["shape"], b["seq"], b["batch"], b.get("method", "sft")))


def compare(runs: list[dict[str, Any]]) -> None:
    """Speed and memory of every run against the median reference run of the same shape, seq and batch."""
    for run in runs:
        refs = [r for r in runs if r["path"] == "reference" and not r.get("error") and same_config(r, run)
                and r.get("tokens_per_second")]
        ok = bool(refs) and not run.get("error") and bool(run.get("tokens_per_second"))
        ref_speed = statistics.median(r["tokens_per_second"] for r in refs) if ok else None
        ref_peak = statistics.median(r["peak_gpu_memory_gib"] or 0 for r in refs) if ok else None
        run["speedup_vs_reference"] = run["tokens_per_second"] / ref_speed if ok else None
        run["memory_vs_reference"] = run["peak_gpu_memory_gib"] / ref_peak if ok and ref_peak else None


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median (and range) of tokens/s and peak memory per path and configuration, over its successful repeats."""
    groups: dict[tuple, list[dict[str, Any]]] = collections.defaultdict(list)
    for run in runs:
        if not run.get("error") and (run["path"] in PATHS or run["path"].startswith("qlora-kit:")):
            groups[(run.get("method", "sft"), run["shape"], run["seq"], run["batch"], run["path"])].append(run)
    rows = []
    for (method, shape, seq, batch, path), group in groups.items():
        speeds = [r["tokens_per_second"] for r in group if r.get("tokens_per_second")]  # none in memory probes
        peaks = [r["peak_gpu_memory_gib"] for r in group if r.get("peak_gpu_memory_gib") is not None]
        step_s = [r["seconds_per_step"] for r in group if r.get("seconds_per_step")]
        rows.append({"method": method, "path": path, "shape": shape, "label": SHAPES[shape]["label"], "seq": seq,
                     "batch": batch, "runs": len(group),
                     "seconds_per_step_median": statistics.median(step_s) if step_s else None,
                     "tokens_per_second_median": statistics.median(speeds) if speeds else None,
                     "tokens_per_second_min": min(speeds) if speeds else None,
                     "tokens_per_second_max": max(speeds) if speeds else None,
                     "peak_gpu_memory_gib": max(peaks) if peaks else None,
                     "peak_reserved_gib": max((r["peak_reserved_gib"] for r in group
                                               if r.get("peak_reserved_gib") is not None), default=None),
                     "first_step_s": min((r["first_step_s"] for r in group if r.get("first_step_s")), default=None),
                     "model_load_s": min((r["model_load_s"] for r in group if r.get("model_load_s")), default=None)})
    for row in rows:
        for other in ("reference", "unsloth"):
            ref = next((r for r in rows if r["path"] == other and same_config(r, row)), None)
            row[f"speed_vs_{other}"] = (row["tokens_per_second_median"] / ref["tokens_per_second_median"]
                                        if ref and row["tokens_per_second_median"] and ref["tokens_per_second_median"]
                                        else None)
            row[f"memory_vs_{other}"] = (row["peak_gpu_memory_gib"] / ref["peak_gpu_memory_gib"]
                                         if ref and ref["peak_gpu_memory_gib"] and row["peak_gpu_memory_gib"] else None)
        ref = next((r for r in rows if r["path"] == "reference" and same_config(r, row)), None)
        row["step_time_vs_reference"] = (row["seconds_per_step_median"] / ref["seconds_per_step_median"]
                                         if ref and ref["seconds_per_step_median"] and row["seconds_per_step_median"]
                                         else None)
    return rows


def step_range(seconds: list[float] | None) -> str:
    return f"{min(seconds):.3f}–{max(seconds):.3f}" if seconds else "—"


# What tokens/s counts, per method: the same on both paths
TOKENS_PER_SECOND = {
    "sft": "tokens/s = every token of every row (rows are exactly `seq` tokens, loss on all of them)",
    "dpo": "tokens/s = every token of prompt + chosen and of prompt + rejected (the two sequences each pair's forward "
           "trains; the reference pass is not counted again); rows are prompt seq/2 + chosen seq/4 + rejected seq/4 "
           "tokens, so a pair counts 1.5 x seq",
    "orpo": "tokens/s = every token of prompt + chosen and of prompt + rejected (as for dpo; ORPO has no reference "
            "pass); a pair counts 1.5 x seq",
    "grpo": "tokens/s = completion tokens generated per second of `generate` (calls after the first "
            f"{WARMUP_STEPS_SKIPPED}); prompts seq/2 tokens, completions exactly seq/2 (min_new_tokens), "
            "`generate s/step` the median call, s/step the whole optimizer step (generation, scoring, backward, "
            "update)",
}


def markdown(results: dict[str, Any]) -> str:
    env, settings = results["env"], results["settings"]
    lines = [
        f"# qlora-kit vs plain transformers + bitsandbytes + peft + trl ({results['date']})", "",
        f"GPU: {env.get('gpu')} ({env.get('gpu_memory_gib', '?')} GiB, driver {env.get('driver', '?')}, "
        f"CUDA {env.get('cuda')}); torch {env.get('torch')}, transformers {env.get('transformers')}, "
        f"bitsandbytes {env.get('bitsandbytes')}, peft {env.get('peft')}, trl {env.get('trl')}, "
        f"accelerate {env.get('accelerate')}, datasets {env.get('datasets')}.", "",
        f"Settings (both paths): NF4 + double quant, {settings['compute_dtype']} compute, LoRA r=16 alpha=32 "
        f"dropout 0 all-linear, gradient checkpointing, {settings['optimizer']}, attention "
        f"{settings.get('attention', 'sdpa')}, lr 2e-4 cosine, loss on all tokens, every row exactly `seq` tokens "
        "(no padding). tokens/s: qlora-kit's own `train_tokens_per_second`, "
        f"and the same marks for the reference (step ends after the first {WARMUP_STEPS_SKIPPED} dropped); peak: "
        "torch.cuda.max_memory_allocated after training, each path in its own process (reserved: "
        "max_memory_reserved, what CUDA graph runs are compared on). unsloth (--paths unsloth): "
        "its own recipe (FastLanguageModel, its offloaded checkpointing, adamw_8bit) on the same model, data, LoRA, "
        "batch and schedule. First step: seconds from the process's start to the end of the first optimizer step "
        "(the shortest of the runs: later runs reuse compiled kernels); load: from the start of loading to the "
        "quantized model with its adapters.", "",
        *(f"- {method}: {TOKENS_PER_SECOND[method]}" for method in dict.fromkeys(
            r.get("method", "sft") for r in results["runs"])), "",
        "| method | path | shape | seq | batch | runs | tokens/s (median) | tokens/s range | peak GiB | reserved GiB "
        "| speed vs reference | memory vs reference | speed vs unsloth | memory vs unsloth | s/step (median) "
        "| step time vs reference | first step s | load s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *("| " + " | ".join([r["method"], r["path"], r["label"], str(r["seq"]), str(r["batch"]), str(r["runs"]),
                            fmt(r["tokens_per_second_median"], ",.0f"),
                            f"{fmt(r['tokens_per_second_min'], ',.0f')}–{fmt(r['tokens_per_second_max'], ',.0f')}",
                            fmt(r["peak_gpu_memory_gib"], ".2f"), fmt(r.get("peak_reserved_gib"), ".2f"),
                            fmt(r["speed_vs_reference"], ".3f"),
                            fmt(r["memory_vs_reference"], ".3f"), fmt(r["speed_vs_unsloth"], ".3f"),
                            fmt(r["memory_vs_unsloth"], ".3f"), fmt(r["seconds_per_step_median"], ".3f"),
                            fmt(r["step_time_vs_reference"], ".3f"), fmt(r["first_step_s"], ".1f"),
                            fmt(r["model_load_s"], ".1f")]) + " |" for r in results["summary"]),
        "", "Every run (speed and memory against the median reference run):", "",
        "| method | path | shape | seq | batch | tokens/s | peak GiB | s/step | step s (min–max) | generate s/step "
        "| measured steps | layers not checkpointed | speed vs reference | memory vs reference | first step s | load s "
        "| Triton kernels compiled | loss per step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        "| --- |"]
    for r in results["runs"]:
        losses = f"**failed:** {r['error']}" if r.get("error") else " ".join(f"{x:.3f}" for x in r.get("losses", []))
        cells = [r.get("method", "sft"), r["path"], r["label"], str(r["seq"]), str(r["batch"]),
                 fmt(r.get("tokens_per_second"), ",.0f"),
                 fmt(r.get("peak_gpu_memory_gib"), ".2f"), fmt(r.get("seconds_per_step"), ".3f"),
                 step_range(r.get("step_seconds")), fmt(r.get("generation_seconds_per_step"), ".3f"),
                 fmt(r.get("measured_steps"), "d"),
                 fmt(r.get("kept_activation_layers"), "d"),
                 fmt(r.get("speedup_vs_reference"), ".3f"),
                 fmt(r.get("memory_vs_reference"), ".3f"), fmt(r.get("first_step_s"), ".1f"),
                 fmt(r.get("model_load_s"), ".1f"), fmt(r.get("triton_kernels_compiled"), "d"), losses]
        lines.append("| " + " | ".join(cells) + " |")
    builds = "; ".join(f"{shape}: {info}" for shape, info in results["models"].items())
    if results.get("warm_ups"):
        lines += ["", "Warm-up runs (3 untimed steps of qlora-kit's defaults before a shape's timed runs): "
                  + "; ".join(f"{w['shape']} b{w['batch']}: {w['wall_s']} s, {w['triton_kernels_compiled']} Triton "
                              f"kernels compiled" + (f", error {w['error']}" if w["error"] else "")
                              for w in results["warm_ups"])]
    lines += ["", f"Model checkpoints (random weights): {builds}",
              f"Total wall time: {results.get('wall_s', '?')} s", ""]
    return "\n".join(lines)


def write_outputs(results: dict[str, Any], out: Path) -> None:
    compare(results["runs"])
    results["summary"] = summarize(results["runs"])
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(results))


# Recipe keys the bench pins to the plain path's settings (qlora_kit_recipe); `--variant defaults` sets them back
PINNED_TO_PLAIN = ("training.optimizer", "speed.keep_activations_layers")


def qlora_kit_defaults() -> list[str]:
    """Overrides that give the pinned keys qlora-kit's own defaults, read from the recipe dataclasses."""
    import dataclasses
    import typing

    sys.path.insert(0, str(ROOT))
    from qlora_kit.recipe import Recipe

    sections = typing.get_type_hints(Recipe)
    overrides = []
    for dotted in PINNED_TO_PLAIN:
        section, key = dotted.split(".")
        default = next(f.default for f in dataclasses.fields(sections[section]) if f.name == key)
        overrides.append(f"{dotted}={default}")
    return overrides


def parse_variants(items: list[str]) -> dict[str, list[str]]:
    """`NAME:k=v,k=v` -> {"qlora-kit:NAME": ["k=v", "k=v"]}, in the order given; `defaults` -> qlora-kit's defaults
    for the keys the bench pins to the plain path's settings."""
    variants: dict[str, list[str]] = {}
    for item in items:
        if item == "defaults":
            variants["qlora-kit:defaults"] = qlora_kit_defaults()
            continue
        name, colon, overrides = item.partition(":")
        if name == "defaults" and sorted(o for o in overrides.split(",") if o) != sorted(qlora_kit_defaults()):
            raise SystemExit(f"--variant: '{item}' is not qlora-kit's defaults ({','.join(qlora_kit_defaults())}): "
                             "`--variant defaults` runs them; name this variant otherwise")
        if not colon or not name or any("=" not in o for o in overrides.split(",") if o):
            raise SystemExit(f"--variant: '{item}' is not NAME:key=value[,key=value...] (or NAME: for no overrides)")
        variants[f"qlora-kit:{name}"] = [o for o in overrides.split(",") if o]
    return variants


# Per method, (configs, seq, steps, grpo completions per prompt) by default, on the GPU and with --tiny
METHOD_DEFAULTS = {
    "sft": {False: ("8b:2,1b:4", 2048, 12, 8), True: ("tiny:2", 128, 4, 4)},
    "dpo": {False: ("8b:2", 2048, 12, 8), True: ("tiny:2", 128, 4, 4)},
    "orpo": {False: ("8b:2", 2048, 12, 8), True: ("tiny:2", 128, 4, 4)},
    "grpo": {False: ("8b:8", 512, 12, 8), True: ("tiny:4", 64, 4, 4)},
}


def method_data(method: str, work: Path, seq: int, rows: int, ragged: bool = False) -> dict[str, Any]:
    """The rows a method trains on, built with the bench tokenizer to exact token lengths (bench_common)."""
    if method == "sft":
        return chat_data(work, seq, rows, ragged)
    if method == "grpo":
        return prompt_data(work, seq // 2, rows)
    return preference_data(work, seq, rows)


def parse_configs(text: str) -> list[tuple[str, int]]:
    configs = []
    for item in text.split(","):
        shape, _, batch = item.strip().partition(":")
        if shape not in SHAPES or not batch.isdigit():
            raise SystemExit(f"--configs: '{item}' is not SHAPE:BATCH with SHAPE one of {', '.join(SHAPES)}")
        configs.append((shape, int(batch)))
    return configs


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=None, help="comma-separated SHAPE:BATCH (shapes: "
                        f"{', '.join(SHAPES)}); default 8b:2,1b:4")
    parser.add_argument("--paths", default="qlora-kit,reference",
                        help="which paths to run: qlora-kit,reference (default) and unsloth")
    parser.add_argument("--unsloth-site", type=Path, default=UNSLOTH_SITE,
                        help="folder holding unsloth and the packages it pins (scripts/device_prelude_unsloth.sh "
                        "installs them there); first on PYTHONPATH for the unsloth process only")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (= max_length); default 2048")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per run; default 12 (tokens/s are timed from the end of step 2)")
    parser.add_argument("--out", default="bench_out", help="folder for bench.json and bench.md")
    parser.add_argument("--work", default="/tmp/qlora_bench", help="models, data and run folders (reused if there)")
    parser.add_argument("--override", action="append", default=[],
                        help="extra qlora-kit recipe override key=value (repeatable)")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:key=value,key=value — run qlora-kit once per variant with these extra overrides "
                        "(repeatable; 'base:' for none; 'defaults' for qlora-kit's own optimizer and kept layers), "
                        "in place of the single qlora-kit path")
    parser.add_argument("--ref-sft-args", default="{}", help="JSON of extra SFTConfig arguments for the reference")
    parser.add_argument("--run-timeout", type=float, default=540, help="seconds allowed to one child process")
    parser.add_argument("--deadline", type=float, default=None,
                        help="stop starting runs after this many seconds; later ones are recorded as skipped")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each path per configuration, alternating which path goes first")
    parser.add_argument("--profile", default="",
                        help="comma-separated paths (reference, qlora-kit or qlora-kit:VARIANT) to run once more "
                        "under torch.profiler (steps 5-6) after the timed runs; writes profile_SHAPE_bBATCH_PATH.txt "
                        "to --out; profiled runs are left out of the comparison")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="cap every run's GPU memory (torch.cuda.set_per_process_memory_fraction), e.g. 79 to "
                        "hold an H200 to what an 80 GB H100 offers")
    parser.add_argument("--method", default="sft",
                        help="comma-separated training methods, each run on every configuration: sft (chat rows), "
                        "dpo / orpo (preference rows: --seq = prompt + chosen + rejected), grpo (prompts of --seq/2 "
                        "tokens, completions of --seq/2; batch = completions per step); defaults follow the first")
    parser.add_argument("--generations", type=int, default=None,
                        help="grpo: completions per prompt (num_generations); default 8 (4 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized dry run; defaults tiny:2, seq 128, 4 steps "
                        "(grpo: tiny:4, seq 64, 4 completions per prompt)")
    parser.add_argument("--warm-up", action="store_true",
                        help="before timing a shape, run qlora-kit's defaults on it for 3 untimed steps, so that every "
                        "timed run finds its Triton kernels compiled (the first run of a new shape compiles them "
                        "inside its measured steps otherwise); recorded under warm_ups, not compared")
    parser.add_argument("--ragged", action="store_true",
                        help="sft: rows of seq/2..seq tokens (uniform), so batches are padded to their longest row as "
                        "real data's are; tokens/s counts the tokens that are not padding")
    parser.add_argument("--sync-debug", action="store_true",
                        help="with --gpu-memory-gib: runs warn at every CUDA synchronisation (once per call site, "
                        "torch.cuda.set_sync_debug_mode): where the GPU's queue is drained each step")
    args = parser.parse_args(argv)
    if args.sync_debug:
        os.environ["BENCH_SYNC_DEBUG"] = "1"  # read by `capped` children
    methods = [m.strip() for m in args.method.split(",")]
    if unknown := [m for m in methods if m not in METHOD_DEFAULTS]:
        raise SystemExit(f"--method: unknown {unknown}; choose from {', '.join(METHOD_DEFAULTS)}")
    defaults = METHOD_DEFAULTS[methods[0]][args.tiny]
    args.configs, args.seq, args.steps, args.generations = (
        given if given is not None else default for given, default in
        zip((args.configs, args.seq, args.steps, args.generations), defaults, strict=True))
    configs = parse_configs(args.configs)
    if "grpo" in methods and any(batch % args.generations for _, batch in configs):
        raise SystemExit(f"--configs: a grpo batch counts completions; make each a multiple of --generations "
                         f"{args.generations}")
    global GPU_MEMORY_CAP_GIB
    GPU_MEMORY_CAP_GIB = args.gpu_memory_gib
    paths = [p.strip() for p in args.paths.split(",")]
    if unknown := [p for p in paths if p not in PATHS]:
        raise SystemExit(f"--paths: unknown {unknown}; choose from {', '.join(PATHS)}")
    if "unsloth" in paths and methods != ["sft"]:
        raise SystemExit(f"--paths unsloth: runs unsloth's SFT recipe only; --method is {args.method}")
    if args.ragged and (methods != ["sft"] or "unsloth" in paths):
        raise SystemExit("--ragged: sft on the qlora-kit and reference paths only (the unsloth child counts "
                         "batch x seq tokens a step)")
    if "unsloth" in paths and (problem := unsloth_site_problem(args.unsloth_site)):
        raise SystemExit(problem)
    if args.steps < WARMUP_STEPS_SKIPPED + 2:
        print(f"--steps {args.steps}: a memory probe; tokens/s need at least {WARMUP_STEPS_SKIPPED + 2} steps",
              flush=True)
    ref_sft_args = json.loads(args.ref_sft_args)
    variants = parse_variants(args.variant)
    if variants and "qlora-kit" in paths:
        at = paths.index("qlora-kit")
        paths[at:at + 1] = list(variants)

    start = time.perf_counter()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    env = read_environment()
    gpu = env["has_gpu"]
    rows = args.steps * max(b for _, b in configs) + 8
    data = {method: method_data(method, work, args.seq, rows, args.ragged) for method in methods}
    settings = {"compute_dtype": "bf16" if gpu else "fp32", "optimizer": "paged_adamw_8bit" if gpu else "adamw_torch",
                **{f"lora_{k}": v for k, v in LORA.items()}, "learning_rate": LEARNING_RATE, "scheduler": SCHEDULER,
                "warmup": WARMUP, "seed": SEED, "quantization": "nf4 + double quant",
                "attention": ", ".join(f"{attention(shape)} ({shape})" for shape, _ in configs),
                "gradient_checkpointing": True, "loss_on": "all", "warmup_steps_skipped": WARMUP_STEPS_SKIPPED}
    if "grpo" in methods:
        settings["grpo"] = grpo_settings({"seq": args.seq, "generations": args.generations})
    results: dict[str, Any] = {"date": env["date"], "env": env, "code": code_version(), "argv": argv,
                               "settings": settings, "data": data["sft"] if methods == ["sft"] else data,
                               "models": {}, "runs": [], "warm_ups": []}

    for shape, batch in configs:
        base = {"shape": shape, "label": SHAPES[shape]["label"], "seq": args.seq, "batch": batch,
                "steps": args.steps, "method": methods[0]}
        if "grpo" in methods:
            base["generations"] = args.generations

        def remaining() -> float:
            left = args.deadline - (time.perf_counter() - start) if args.deadline else args.run_timeout
            return min(args.run_timeout, left)

        try:
            if remaining() < 30:
                raise RuntimeError("skipped: --deadline reached")
            model, build = ensure_model(shape, work, remaining(), args.seq)
            for spec in data.values():
                check_model_tokenizer(model, Path(spec["path"]))
            results["models"].setdefault(shape, build)
        except RuntimeError as exc:
            results["runs"] += [{**base, "method": method, "path": path, "error": str(exc)} for method in methods
                                for path in paths]
            write_outputs(results, out)
            continue
        if args.warm_up and remaining() >= 30:
            kernels_before = triton_cache_entries()
            warm = run_qlora_kit({**base, "steps": 3}, model, Path(data[methods[0]]["path"]), work, gpu,
                                 args.override + qlora_kit_defaults(), remaining(), "qlora-kit:warm-up")
            results["warm_ups"].append({"shape": shape, "batch": batch, "wall_s": warm.get("wall_s"),
                                        "error": warm.get("error"),
                                        "triton_kernels_compiled": triton_cache_entries() - kernels_before})
        order = [(method, repeat, path) for method in methods for repeat in range(args.repeats)
                 for path in (paths if repeat % 2 == 0 else paths[::-1])]
        order += [(method, args.repeats, "profile " + path) for method in methods
                  for path in args.profile.split(",") if path]
        for method, repeat, path in order:
            run_base = {**base, "method": method, "repeat": repeat}
            rows_path = Path(data[method]["path"])
            profiled = shape if method == "sft" else f"{method}_{shape}"  # the profile file's name
            kernels_before = triton_cache_entries()
            if remaining() < 30:
                record = {**run_base, "path": path, "error": "skipped: --deadline reached"}
            elif path.removeprefix("profile ").startswith("qlora-kit"):
                name = path.removeprefix("profile ")
                peaks = [r.get("peak_gpu_memory_gib") for r in results["runs"] if r.get("path") == "reference"
                         and r.get("shape") == shape and r.get("method") == method and r.get("peak_gpu_memory_gib")]
                try:
                    overrides = matched_to_reference(args.override + variants.get(name, []),
                                                     peaks[-1] if peaks else None)
                except RuntimeError as exc:
                    results["runs"].append({**run_base, "path": path, "error": str(exc)})
                    continue
                profile_out = profile_path(out, profiled, batch, path)
                record = run_qlora_kit(run_base, model, rows_path, work, gpu, overrides, remaining(), path,
                                       profile_out)
            elif path == "unsloth":
                record = run_unsloth(run_base, model, rows_path, work, args.unsloth_site, remaining())
            else:
                record = run_reference(run_base, model, rows_path, work, gpu, ref_sft_args, remaining(),
                                       profile_path(out, profiled, batch, path))
            record["triton_kernels_compiled"] = triton_cache_entries() - kernels_before
            results["runs"].append(record)
            results["wall_s"] = round(time.perf_counter() - start, 1)
            write_outputs(results, out)

    results["wall_s"] = round(time.perf_counter() - start, 1)
    write_outputs(results, out)
    print("\n" + markdown(results), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "reference":
        cmd_reference(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "unsloth":
        cmd_unsloth(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "capped":
        cmd_capped(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "timed":
        cmd_timed(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "profile-qlora-kit":
        cmd_profile_qlora_kit(*sys.argv[2:])
    else:
        main(sys.argv[1:])
