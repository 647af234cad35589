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

  python scripts/bench.py --out $OUT                          # 8b:2 and 1b:4, the reference numbers' settings
  python scripts/bench.py --configs 8b:2 --variant same: --variant defaults --variant auto:training.optimizer=auto \
      --variant nofuse:speed.fused_lora=false --profile qlora-kit:auto   # levers side by side with the reference
  python scripts/bench.py --configs 8b:8 --ref-sft-args '{"use_liger_kernel": true}'   # the reference's best
  python scripts/bench.py --configs 70b:1 --paths qlora-kit --steps 4 --override speed.offload_checkpoints=true
  python scripts/bench.py --configs 8b:1 --seq 350000 --steps 1 --paths qlora-kit --gpu-memory-gib 79 \
      --override speed.offload_checkpoints=true --override speed.mlp_chunk_tokens=32768   # long-context memory probe
  python scripts/bench.py --tiny --out /tmp/bench             # CPU dry run on a tiny shape, in about a minute
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Real Llama shapes; rope scaling and max positions do not change the cost of a 2048-token step.
SHAPES: dict[str, dict[str, Any]] = {
    "70b": dict(label="Llama-3-70B", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                rope_theta=500000.0, tie_word_embeddings=False),
    "8b": dict(label="Llama-3-8B", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
               rope_theta=500000.0, tie_word_embeddings=False),
    "3b": dict(label="Llama-3.2-3B", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
               rope_theta=500000.0, tie_word_embeddings=True),
    "1b": dict(label="Llama-3.2-1B", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
               rope_theta=500000.0, tie_word_embeddings=True),
    "tiny": dict(label="tiny", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=8192, max_position_embeddings=2048, rope_theta=500000.0,
                 tie_word_embeddings=False),
}
PATHS = ("qlora-kit", "reference")

# The seed recipe's settings, shared by both paths.
LORA = dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
LEARNING_RATE, SCHEDULER, WARMUP, SEED = 2e-4, "cosine", 0.03, 42
WARMUP_STEPS_SKIPPED = 2  # as qlora_kit.trainers.MetricsLog.warmup_steps

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["[UNK]", "<|pad|>", "<|im_start|>", "<|im_end|>"]
COMMON_WORDS = (  # noqa: SIM905 (a sentence reads better than 150 quoted words)
    "the of and to in a is that for it as was with be by on not he i this are or his from at which but have an they "
    "you were her she there one all we their been has when who will more no if out so said what up its about into "
    "than them can only other new some could time these two may then do first any my now such like our over man me "
    "even most made after also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come since against go "
    "came right used take three user assistant system"
).split()


# ------------------------------------------------------------------------------------------- tokenizer and data


def vocabulary(size: int = 2000) -> list[str]:
    """Common English words plus pronounceable made-up ones: text-like, and one word is always one token."""
    rng = random.Random(0)
    onsets = ["b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "br", "cl", "dr", "fr",
              "gr", "pl", "st", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "st", "ng"]
    words = list(dict.fromkeys(COMMON_WORDS))
    seen = set(words)
    while len(words) < size:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(1, 3))) + rng.choice(codas)
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def build_tokenizer(folder: Path):
    """A word-level fast tokenizer with a ChatML template; ids stay far below the models' vocab size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = vocabulary()
    tokens = SPECIALS + words + [w.capitalize() for w in words] + [".", ",", "?", "!", ":", ";"]
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="<|pad|>",
                                        bos_token="<|im_start|>", eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return tokenizer


def sentence_tokens(rng: random.Random, words: list[str], weights: list[float], budget: int) -> list[str]:
    """Exactly `budget` tokens of Zipf-distributed words in sentences (punctuation is a token of its own)."""
    out: list[str] = []
    while len(out) < budget:
        length = min(rng.randint(6, 24), budget - len(out))
        if length == 1:
            out.append(rng.choices(words, weights)[0])
            break
        sentence = rng.choices(words, weights, k=length - 1)
        sentence[0] = sentence[0].capitalize()
        out += sentence + [rng.choice(".....?!")]
    return out


def join_tokens(tokens: list[str]) -> str:
    text = ""
    for token in tokens:
        text += token if token in ".,?!:;" or not text else " " + token
    return text


def write_dataset(tokenizer, path: Path, seq: int, rows: int) -> dict[str, Any]:
    """Chat rows (user question, long assistant answer) that each render to exactly `seq` tokens."""
    rng = random.Random(1234)
    words = vocabulary()
    weights = [1.0 / (rank + 10) for rank in range(len(words))]
    probe = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello"}]
    overhead = len(tokenizer.apply_chat_template(probe, tokenize=True, return_dict=True)["input_ids"]) - 2
    lengths, unknown = [], 0
    unk = tokenizer.convert_tokens_to_ids("[UNK]")
    with path.open("w") as handle:
        for _ in range(rows):
            user = rng.randint(seq // 8, seq // 4)
            messages = [{"role": "user", "content": join_tokens(sentence_tokens(rng, words, weights, user))},
                        {"role": "assistant",
                         "content": join_tokens(sentence_tokens(rng, words, weights, seq - overhead - user))}]
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            lengths.append(len(ids))
            unknown += ids.count(unk)
            handle.write(json.dumps({"messages": messages}) + "\n")
    if min(lengths) != seq or max(lengths) != seq or unknown:
        raise SystemExit(f"dataset rows are {min(lengths)}..{max(lengths)} tokens with {unknown} unknown (want "
                         f"exactly {seq}, none unknown); fix the generator before timing anything")
    return {"path": str(path), "rows": rows, "tokens_per_row": seq}


# ------------------------------------------------------------------------------------------------ subprocesses


def cmd_env() -> None:
    """Versions and device, printed as one JSON line."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    info: dict[str, Any] = {"date": datetime.date.today().isoformat(), "python": sys.version.split()[0]}
    for name in ("torch", "transformers", "bitsandbytes", "peft", "trl", "accelerate", "datasets", "tokenizers",
                 "liger-kernel"):
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = "not installed"
    info["cuda"] = torch.version.cuda
    # qlora-kit's step is short enough that the host CPU's kernel-launch rate shows in tokens/s: record the host
    cpu = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
           if line.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
    info["cpu"] = f"{cpu[0]} x{len(cpu)}" if cpu else "unknown"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = "unknown"
    else:
        info["gpu"] = "none (CPU)"
    print("BENCH_JSON " + json.dumps(info))


def shape_config(shape: str, tokenizer, seq: int = 0):
    """(LlamaConfig of `shape` with the tokenizer's special ids, those ids); rows longer than the shape's positions
    get positions for `seq`, RoPE-scaled the way Llama 3.1 scales them (a long-context probe)."""
    from transformers import LlamaConfig

    spec = {k: v for k, v in SHAPES[shape].items() if k != "label"}
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = LlamaConfig(**spec, **ids, rms_norm_eps=1e-5, initializer_range=0.02)
    original = config.max_position_embeddings
    if seq > original:
        factor = -(-seq // original)
        config.max_position_embeddings = factor * original
        config.rope_parameters = {"rope_type": "llama3", "rope_theta": spec["rope_theta"], "factor": float(factor),
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": original}
    return config, ids


def cmd_build_model(shape: str, folder: str, tokenizer_folder: str, seq: str = "0") -> None:
    """Random bf16 model of `shape`, built on the GPU (CPU in fp32 without one), saved with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config, ids = shape_config(shape, tokenizer, int(seq))
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if cuda:
        torch.cuda.synchronize()
    built = time.perf_counter()
    model.generation_config = GenerationConfig(**ids)
    partial = Path(folder + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, folder)
    os.sync()  # the checkpoint's dirty pages are written now, not by kernel threads during the first timed run
    saved = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    print("BENCH_JSON " + json.dumps({"parameters": params, "build_s": round(built - start, 1),
                                      "save_s": round(saved - built, 1)}))


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


def cmd_reference(spec_path: str) -> None:
    """The plain path: transformers + bitsandbytes + peft + trl glued by hand, as their docs show."""
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], quantization_config=bnb, dtype=dtype,
                                                 attn_implementation="sdpa", device_map={"": 0 if cuda else "cpu"})
    model = prepare_model_for_kbit_training(model)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    args = SFTConfig(
        output_dir=spec["output_dir"], max_length=spec["seq"], per_device_train_batch_size=spec["batch"],
        gradient_checkpointing=True, optim=spec["optimizer"], bf16=cuda, max_steps=spec["steps"],
        learning_rate=LEARNING_RATE, lr_scheduler_type=SCHEDULER, warmup_steps=WARMUP, seed=SEED,
        logging_steps=1, report_to="none", **spec.get("sft_args", {}))

    class StepLog(TrainerCallback):
        """Step-end times and logged losses; the same marks qlora-kit's MetricsLog takes."""

        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []
            self.losses: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), state.global_step))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    steps = StepLog()
    callbacks = [steps] + ([profile_callback(Path(spec["profile_out"]))] if spec.get("profile_out") else [])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora, callbacks=callbacks)
    loaded = time.perf_counter()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    # Every row is exactly `seq` tokens (checked here), so a step trains batch * seq tokens.
    row_lengths = {len(ids) for ids in trainer.train_dataset["input_ids"]}
    marks = steps.marks[WARMUP_STEPS_SKIPPED - 1:]  # from the end of the last skipped step
    (t0, s0), (t1, s1) = (marks[0], marks[-1]) if len(marks) >= 2 else ((0.0, 0), (0.0, 0))
    tokens_per_step = spec["batch"] * max(row_lengths)
    from qlora_kit.trainers import step_durations  # after training: the plain path imports nothing of qlora-kit's

    print("BENCH_JSON " + json.dumps({
        "tokens_per_second": tokens_per_step * (s1 - s0) / (t1 - t0) if s1 > s0 else None,
        "seconds_per_step": (t1 - t0) / (s1 - s0) if s1 > s0 else None,
        "measured_steps": s1 - s0, "step_seconds": step_durations(marks), "peak_gpu_memory_gib": peak,
        "losses": steps.losses,
        "row_tokens": sorted(row_lengths), "setup_s": round(loaded - start, 1),
        "trainable_parameters": trainer.model.get_nb_trainable_parameters()[0]}))


GPU_MEMORY_CAP_GIB: float | None = None  # --gpu-memory-gib: children see a GPU this big (80 GB claims on an H200)


def capped(command: list[str]) -> list[str]:
    """The same child command, run under torch.cuda.set_per_process_memory_fraction when --gpu-memory-gib is set."""
    if GPU_MEMORY_CAP_GIB is None:
        return command
    return [sys.executable, __file__, "capped", str(GPU_MEMORY_CAP_GIB), *command[1:]]


def cmd_capped(gib: str, *argv: str) -> None:
    """Cap this process's GPU memory at `gib` GiB, then run `python ARGV...` (a module with -m, else a script)."""
    import runpy

    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(gib) / total))
        print(f"GPU memory capped at {float(gib):.1f} of {total:.1f} GiB", flush=True)
        if os.environ.get("BENCH_SYNC_DEBUG") == "1":
            torch.cuda.set_sync_debug_mode("warn")
    else:
        print("no GPU: --gpu-memory-gib ignored", flush=True)
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


def run_logged(command: list[str], timeout: float, log_name: str) -> tuple[int | str, dict[str, Any], list[str], float]:
    """Run a child in its own process group, echo its output, and return (status, its BENCH_JSON, tail, seconds)."""
    print(f"\n=== {log_name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    result: dict[str, Any] = {}
    quiet = {"PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    # Own process group (not session): a timeout kills the child's whole tree, and the caller's kill still reaches it.
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               bufsize=1, process_group=0, env={**os.environ, **quiet})
    deadline = start + timeout
    status: int | str
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("BENCH_JSON "):
                result = json.loads(line.removeprefix("BENCH_JSON "))
                continue
            sys.stdout.write(line)
            tail.append(line.rstrip("\n"))
            if time.perf_counter() > deadline:
                raise subprocess.TimeoutExpired(command, timeout)
        status = process.wait(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        status = f"timeout after {timeout:.0f} s"
    sys.stdout.flush()
    return status, result, list(tail), time.perf_counter() - start


def error_summary(status: int | str, tail: list[str]) -> str:
    """The line that says what went wrong (OOM, exception), else the exit status."""
    for line in reversed(tail):
        if any(key in line for key in ("OutOfMemoryError", "out of memory", "Error", "error:")):
            return f"exit {status}: {line.strip()[:300]}"
    return f"exit {status}"


# -------------------------------------------------------------------------------------------------- orchestrator


def ensure_model(shape: str, work: Path, timeout: float, seq: int = 0) -> tuple[Path, dict[str, Any]]:
    """The shape's random checkpoint under work/models (built once); rows longer than the shape's positions get a
    Llama-3.1-style RoPE-scaled copy (same cost per token: scaling only changes the rotary frequencies)."""
    long = seq > SHAPES[shape]["max_position_embeddings"]
    if shape == "70b" and not long:  # 140 GB of bf16 does not fit the disk: decoder linears become sparse holes
        from multi_gpu import build_sparse_model

        folder = work / "models" / "70b_sparse"
        return folder, build_sparse_model(shape, folder, work / "tokenizer")
    folder = work / "models" / (f"{shape}_pos{seq}" if long else shape)
    if (folder / "config.json").is_file():
        return folder, {"reused": True}
    folder.parent.mkdir(parents=True, exist_ok=True)
    status, result, tail, seconds = run_logged(
        [sys.executable, __file__, "build-model", shape, str(folder), str(work / "tokenizer"), str(seq)], timeout,
        f"build {shape}")
    if status != 0:
        raise RuntimeError(f"building the {shape} model failed: {error_summary(status, tail)}")
    return folder, {**result, "wall_s": round(seconds, 1)}


def qlora_kit_recipe(model: Path, data: Path, work: Path, shape: str, seq: int, batch: int, steps: int,
                     gpu: bool) -> dict[str, Any]:
    """The seed settings as a qlora-kit recipe."""
    return {
        "model": {"name": str(model), "attn_implementation": "sdpa"},
        "quantization": {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True,
                         "compute_dtype": "bf16" if gpu else "fp32"},
        "lora": dict(LORA),
        "data": {"datasets": [{"path": str(data)}], "loss_on": "all"},
        "training": {"output_dir": str(work / "runs"), "run_name": f"{shape}_s{seq}_b{batch}", "max_length": seq,
                     "batch_size": batch, "max_steps": steps, "learning_rate": LEARNING_RATE,
                     "lr_scheduler": SCHEDULER, "warmup": WARMUP, "seed": SEED,
                     "optimizer": "paged_adamw_8bit" if gpu else "adamw_torch", "gradient_checkpointing": True,
                     "logging_steps": 1, "save_steps": max(200, steps + 1), "overwrite": True},
        "evaluation": {"metric": "none"},
        "export": {"merge": False},
        # every layer checkpointed, as on the plain path; `speed.keep_activations_layers=auto` (qlora-kit's default)
        # spends the GPU's free memory on skipping recomputes instead
        "speed": {"keep_activations_layers": 0},
    }


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


def run_qlora_kit(base: dict[str, Any], model: Path, data: Path, work: Path, gpu: bool, overrides: list[str],
                  timeout: float, label: str = "qlora-kit", profile_out: Path | None = None) -> dict[str, Any]:
    import yaml

    shape, seq, batch, steps = base["shape"], base["seq"], base["batch"], base["steps"]
    recipe = qlora_kit_recipe(model, data, work, shape, seq, batch, steps, gpu)
    recipe_path = work / f"recipe_{shape}_s{seq}_b{batch}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_dir = work / "runs" / recipe["training"]["run_name"]
    command = ([sys.executable, __file__, "profile-qlora-kit", str(recipe_path), str(profile_out)] if profile_out
               else [sys.executable, "-m", "qlora_kit", "train", str(recipe_path)])
    status, _, tail, seconds = run_logged(capped(command + overrides), timeout, f"{label} {shape} b{batch}")
    record = {**base, "path": label, "overrides": overrides, "wall_s": round(seconds, 1)}
    summary_path = run_dir / "summary.json"
    if status != 0 or not summary_path.is_file():
        return {**record, "error": error_summary(status, tail), "log_tail": tail[-15:]}
    try:  # qlora-kit's own config-only estimate, to see how close it lands
        from qlora_kit.model import estimate_training_memory
        from qlora_kit.recipe import load_recipe

        estimate = round(estimate_training_memory(load_recipe(recipe_path, overrides), str(model))["total"], 2)
    except Exception as exc:  # the estimate is a side note; never lose a measurement over it
        estimate = f"unavailable: {exc!r:.200}"
    return {**record, **run_measurements(run_dir), "estimated_peak_gib": estimate, "error": None}


def run_measurements(run_dir: Path) -> dict[str, Any]:
    """What a finished qlora-kit run folder says about speed, memory and loss (summary.json, metrics.jsonl)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"tokens_per_second": summary.get("train_tokens_per_second"),
            "seconds_per_step": summary.get("seconds_per_step"), "measured_steps": summary.get("measured_steps"),
            "peak_gpu_memory_gib": summary.get("peak_gpu_memory_gib"),
            "kept_activation_layers": summary.get("kept_activation_layers"),
            "step_seconds": summary.get("step_seconds"), "losses": [m["loss"] for m in metrics if "loss" in m]}


def run_reference(base: dict[str, Any], model: Path, data: Path, work: Path, gpu: bool, sft_args: dict[str, Any],
                  timeout: float, profile_out: Path | None = None) -> dict[str, Any]:
    shape, seq, batch = base["shape"], base["seq"], base["batch"]
    spec = {"model": str(model), "data": str(data), "seq": seq, "batch": batch, "steps": base["steps"],
            "optimizer": "paged_adamw_8bit" if gpu else "adamw_torch", "sft_args": sft_args,
            "output_dir": str(work / "runs" / f"reference_{shape}_s{seq}_b{batch}"),
            "profile_out": str(profile_out) if profile_out else None}
    spec_path = work / f"reference_{shape}_s{seq}_b{batch}.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    status, result, tail, seconds = run_logged(capped([sys.executable, __file__, "reference", str(spec_path)]),
                                               timeout, f"reference {shape} b{batch}")
    record = {**base, "path": "profile reference" if profile_out else "reference", "sft_args": sft_args,
              "wall_s": round(seconds, 1)}
    if status != 0 or "tokens_per_second" not in result:
        return {**record, "error": error_summary(status, tail), "log_tail": tail[-15:]}
    return {**record, **result, "kept_activation_layers": 0, "error": None}  # the seed recipe checkpoints every layer


def same_config(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["shape"], a["seq"], a["batch"]) == (b["shape"], b["seq"], b["batch"])


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
            groups[(run["shape"], run["seq"], run["batch"], run["path"])].append(run)
    rows = []
    for (shape, seq, batch, path), group in groups.items():
        speeds = [r["tokens_per_second"] for r in group if r.get("tokens_per_second")]  # none in memory probes
        peaks = [r["peak_gpu_memory_gib"] for r in group if r.get("peak_gpu_memory_gib") is not None]
        rows.append({"path": path, "shape": shape, "label": SHAPES[shape]["label"], "seq": seq, "batch": batch,
                     "runs": len(group),
                     "tokens_per_second_median": statistics.median(speeds) if speeds else None,
                     "tokens_per_second_min": min(speeds) if speeds else None,
                     "tokens_per_second_max": max(speeds) if speeds else None,
                     "peak_gpu_memory_gib": max(peaks) if peaks else None})
    for row in rows:
        ref = next((r for r in rows if r["path"] == "reference" and same_config(r, row)), None)
        row["speed_vs_reference"] = (row["tokens_per_second_median"] / ref["tokens_per_second_median"]
                                     if ref and row["tokens_per_second_median"] and ref["tokens_per_second_median"]
                                     else None)
        row["memory_vs_reference"] = (row["peak_gpu_memory_gib"] / ref["peak_gpu_memory_gib"]
                                      if ref and ref["peak_gpu_memory_gib"] and row["peak_gpu_memory_gib"] else None)
    return rows


def fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def step_range(seconds: list[float] | None) -> str:
    return f"{min(seconds):.3f}–{max(seconds):.3f}" if seconds else "—"


def markdown(results: dict[str, Any]) -> str:
    env, settings = results["env"], results["settings"]
    lines = [
        f"# qlora-kit vs plain transformers + bitsandbytes + peft + trl ({results['date']})", "",
        f"GPU: {env.get('gpu')} ({env.get('gpu_memory_gib', '?')} GiB, driver {env.get('driver', '?')}, "
        f"CUDA {env.get('cuda')}); torch {env.get('torch')}, transformers {env.get('transformers')}, "
        f"bitsandbytes {env.get('bitsandbytes')}, peft {env.get('peft')}, trl {env.get('trl')}, "
        f"accelerate {env.get('accelerate')}, datasets {env.get('datasets')}.", "",
        f"Settings (both paths): NF4 + double quant, {settings['compute_dtype']} compute, LoRA r=16 alpha=32 "
        f"dropout 0 all-linear, gradient checkpointing, {settings['optimizer']}, sdpa, lr 2e-4 cosine, loss on all "
        "tokens, every row exactly `seq` tokens (no padding). tokens/s: qlora-kit's own `train_tokens_per_second`, "
        f"and the same marks for the reference (step ends after the first {WARMUP_STEPS_SKIPPED} dropped); peak: "
        "torch.cuda.max_memory_allocated after training, each path in its own process.", "",
        "| path | shape | seq | batch | runs | tokens/s (median) | tokens/s range | peak GiB | speed vs reference "
        "| memory vs reference |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *("| " + " | ".join([r["path"], r["label"], str(r["seq"]), str(r["batch"]), str(r["runs"]),
                            fmt(r["tokens_per_second_median"], ",.0f"),
                            f"{fmt(r['tokens_per_second_min'], ',.0f')}–{fmt(r['tokens_per_second_max'], ',.0f')}",
                            fmt(r["peak_gpu_memory_gib"], ".2f"), fmt(r["speed_vs_reference"], ".3f"),
                            fmt(r["memory_vs_reference"], ".3f")]) + " |" for r in results["summary"]),
        "", "Every run (speed and memory against the median reference run):", "",
        "| path | shape | seq | batch | tokens/s | peak GiB | s/step | step s (min–max) | measured steps "
        "| layers not checkpointed | speed vs reference | memory vs reference | loss per step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["runs"]:
        losses = f"**failed:** {r['error']}" if r.get("error") else " ".join(f"{x:.3f}" for x in r.get("losses", []))
        cells = [r["path"], r["label"], str(r["seq"]), str(r["batch"]), fmt(r.get("tokens_per_second"), ",.0f"),
                 fmt(r.get("peak_gpu_memory_gib"), ".2f"), fmt(r.get("seconds_per_step"), ".3f"),
                 step_range(r.get("step_seconds")), fmt(r.get("measured_steps"), "d"),
                 fmt(r.get("kept_activation_layers"), "d"),
                 fmt(r.get("speedup_vs_reference"), ".3f"),
                 fmt(r.get("memory_vs_reference"), ".3f"), losses]
        lines.append("| " + " | ".join(cells) + " |")
    builds = "; ".join(f"{shape}: {info}" for shape, info in results["models"].items())
    lines += ["", f"Model checkpoints (random weights): {builds}",
              f"Total wall time: {results.get('wall_s', '?')} s", ""]
    return "\n".join(lines)


def write_outputs(results: dict[str, Any], out: Path) -> None:
    compare(results["runs"])
    results["summary"] = summarize(results["runs"])
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(results))


def code_version() -> dict[str, Any]:
    """The qlora-kit commit measured, and whether its package had uncommitted changes (None where git is absent)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "qlora_kit"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "qlora_kit_changes": None}
    if commit.returncode != 0:
        return {"commit": None, "qlora_kit_changes": None}
    return {"commit": commit.stdout.strip(), "qlora_kit_changes": dirty.stdout.split("\n")[:-1]}


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
    parser.add_argument("--paths", default=",".join(PATHS), help="which paths to run: qlora-kit,reference")
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
    parser.add_argument("--tiny", action="store_true", help="CPU-sized dry run; defaults tiny:2, seq 128, 4 steps")
    parser.add_argument("--sync-debug", action="store_true",
                        help="with --gpu-memory-gib: runs warn at every CUDA synchronisation (once per call site, "
                        "torch.cuda.set_sync_debug_mode): where the GPU's queue is drained each step")
    args = parser.parse_args(argv)
    if args.sync_debug:
        os.environ["BENCH_SYNC_DEBUG"] = "1"  # read by `capped` children
    defaults = ("tiny:2", 128, 4) if args.tiny else ("8b:2,1b:4", 2048, 12)
    args.configs, args.seq, args.steps = (given if given is not None else default for given, default in
                                          zip((args.configs, args.seq, args.steps), defaults, strict=True))
    configs = parse_configs(args.configs)
    global GPU_MEMORY_CAP_GIB
    GPU_MEMORY_CAP_GIB = args.gpu_memory_gib
    paths = [p.strip() for p in args.paths.split(",")]
    if unknown := [p for p in paths if p not in PATHS]:
        raise SystemExit(f"--paths: unknown {unknown}; choose from {', '.join(PATHS)}")
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
    status, env, tail, _ = run_logged([sys.executable, __file__, "env"], 120, "environment")
    if status != 0:
        raise SystemExit(f"could not read the environment: {error_summary(status, tail)}")
    gpu = env.get("gpu") != "none (CPU)"
    tokenizer = build_tokenizer(work / "tokenizer")
    rows = args.steps * max(b for _, b in configs) + 8
    data = write_dataset(tokenizer, work / f"chat_s{args.seq}_r{rows}.jsonl", args.seq, rows)
    settings = {"compute_dtype": "bf16" if gpu else "fp32", "optimizer": "paged_adamw_8bit" if gpu else "adamw_torch",
                **{f"lora_{k}": v for k, v in LORA.items()}, "learning_rate": LEARNING_RATE, "scheduler": SCHEDULER,
                "warmup": WARMUP, "seed": SEED, "attention": "sdpa", "quantization": "nf4 + double quant",
                "gradient_checkpointing": True, "loss_on": "all", "warmup_steps_skipped": WARMUP_STEPS_SKIPPED}
    results: dict[str, Any] = {"date": env["date"], "env": env, "code": code_version(), "argv": argv,
                               "settings": settings, "data": data, "models": {}, "runs": []}

    for shape, batch in configs:
        base = {"shape": shape, "label": SHAPES[shape]["label"], "seq": args.seq, "batch": batch,
                "steps": args.steps}

        def remaining() -> float:
            left = args.deadline - (time.perf_counter() - start) if args.deadline else args.run_timeout
            return min(args.run_timeout, left)

        try:
            if remaining() < 30:
                raise RuntimeError("skipped: --deadline reached")
            model, build = ensure_model(shape, work, remaining(), args.seq)
            results["models"].setdefault(shape, build)
        except RuntimeError as exc:
            results["runs"] += [{**base, "path": path, "error": str(exc)} for path in paths]
            write_outputs(results, out)
            continue
        order = [(repeat, path) for repeat in range(args.repeats)
                 for path in (paths if repeat % 2 == 0 else paths[::-1])]
        order += [(args.repeats, "profile " + path) for path in args.profile.split(",") if path]
        for repeat, path in order:
            run_base = {**base, "repeat": repeat}
            if remaining() < 30:
                record = {**run_base, "path": path, "error": "skipped: --deadline reached"}
            elif path.removeprefix("profile ").startswith("qlora-kit"):
                name = path.removeprefix("profile ")
                overrides = args.override + variants.get(name, [])
                profile_out = profile_path(out, shape, batch, path)
                record = run_qlora_kit(run_base, model, Path(data["path"]), work, gpu, overrides, remaining(), path,
                                       profile_out)
            else:
                record = run_reference(run_base, model, Path(data["path"]), work, gpu, ref_sft_args, remaining(),
                                       profile_path(out, shape, batch, path))
            results["runs"].append(record)
            results["wall_s"] = round(time.perf_counter() - start, 1)
            write_outputs(results, out)

    results["wall_s"] = round(time.perf_counter() - start, 1)
    write_outputs(results, out)
    print("\n" + markdown(results), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "env":
        cmd_env()
    elif len(sys.argv) > 1 and sys.argv[1] == "build-model":
        cmd_build_model(*sys.argv[2:6])
    elif len(sys.argv) > 1 and sys.argv[1] == "reference":
        cmd_reference(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "capped":
        cmd_capped(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "profile-qlora-kit":
        cmd_profile_qlora_kit(*sys.argv[2:])
    else:
        main(sys.argv[1:])
