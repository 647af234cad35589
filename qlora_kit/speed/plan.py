"""The speed plan: every speed choice of a run, decided once from the recipe, the model config and the machine, logged
as one block, written to summary.json (`speed_plan`) and applied in one place (`ApplySpeedPlan`).

The pipeline decides it right before it builds the trainer, with the weights loaded: the GPU memory this process can
still use is measured then, and `speed.keep_activations_layers: auto` spends it. Nothing downstream asks the recipe's
`speed` section or the machine again.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import logging
import os
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import TrainerCallback

from qlora_kit.memory import (
    allocated_peak_gib,
    estimate_memory_for_config,
    generation_peak_gib,
    long_context_settings,
    rows_of_length,
)
from qlora_kit.model import (
    FLEX,
    FUSED_GATE_ACTIVATIONS,
    cache_root,
    fused_mlp_blocker,
    gate_activation_name,
    liger_kernel_installed,
    under_fsdp,
)
from qlora_kit.recipe import PAIRED_METHODS, Recipe, SpeedSection
from qlora_kit.speed.attention import (
    AttentionShape,
    apply_attention_kernel,
    choose_attention_kernel,
    flex_attention_blocker,
    restore_attention_kernel,
    set_attention_implementation,
)
from qlora_kit.speed.checkpointing import offloaded_checkpoint, reentrant_checkpoint
from qlora_kit.speed.cuda_graphs import model_graphs, use_cuda_graphs
from qlora_kit.speed.fp8 import FP8_MIN_TOKENS, FP8_MIN_TOKENS_GRAPHED, FP8_MIN_WIDTH, float8_matmul_works
from qlora_kit.speed.lora_autograd import forget_compute_copies
from qlora_kit.speed.nf4_triton import nf4_dequantize_kernel
from qlora_kit.speed.patches import (
    chunk_mlps,
    compile_decoder_layers,
    keep_activations,
    use_checkpoint_function,
    use_fused_lora,
    use_fused_mlp,
)
from qlora_kit.speed.shared_prefix import share_pair_prefixes, use_flex_attention_for_pairs

log = logging.getLogger("qlora_kit")

Checkpointing = Literal["none", "non-reentrant", "reentrant", "offloaded"]


@dataclass(frozen=True)
class Machine:
    """What the plan needs to know about where it runs, measured once."""

    gpus: int  # CUDA devices this process sees (0: CPU)
    usable_gpu_gib: float  # what this process can still allocate on its GPU now (its memory-fraction cap included)
    capability: tuple[int, int] | None  # the GPU's compute capability
    processes: int  # WORLD_SIZE: several under DDP / FSDP
    under_fsdp: bool
    triton: bool  # qlora-kit's Triton kernel can be built (a GPU and Triton)
    liger: bool  # liger-kernel is installed
    float8: bool = False  # the GPU runs torch's rowwise-scaled float8 matmul (fp8.float8_matmul_works)

    @classmethod
    def measure(cls) -> Machine:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        usable, capability = 0.0, None
        if gpus:
            device = torch.cuda.current_device()
            free, total = torch.cuda.mem_get_info(device)
            fraction = torch.cuda.get_per_process_memory_fraction(device) if hasattr(
                torch.cuda, "get_per_process_memory_fraction") else 1.0  # torch >= 2.9; no cap before
            usable = min(total * fraction, free + torch.cuda.memory_reserved(device)) / 2**30
            capability = torch.cuda.get_device_capability(device)
        return cls(gpus=gpus, usable_gpu_gib=usable, capability=capability,
                   processes=int(os.environ.get("WORLD_SIZE", "1")), under_fsdp=under_fsdp(),
                   triton=gpus > 0 and nf4_dequantize_kernel() is not None, liger=liger_kernel_installed(),
                   float8=gpus > 0 and float8_matmul_works())


@dataclass(frozen=True)
class SpeedPlan:
    """The run's speed choices (see the `speed` recipe section for what each does)."""

    fused_lora: bool  # LoRA over 4-bit weights through LoraOver4bit
    fused_mlp: bool  # gated MLPs (SiLU, tanh-GELU) through GatedDownOver4bit
    triton_dequantize: bool  # NF4 weights dequantize through qlora-kit's Triton kernel (where it covers the weight)
    fp8_matmul: bool  # ... and their big matmuls run in float8 (speed/fp8.py; where fp8_applies)
    cuda_graphs: bool  # decoder layers replay CUDA graphs of their training forward and backward (cuda_graphs.py)
    cast_adapters_once: bool  # the adapter weights' compute-dtype copies kept between optimizer steps
    liger_kernels: bool  # trl/transformers' use_liger_kernel
    attention_kernel: str  # default: PyTorch's SDPA kernel order (eager: eager); flash: cuDNN's attention off; flex:
    # an eager model's attention through flex attention while it trains (speed/attention.py)
    compile_layers: bool
    compile_blocker: str | None  # why the decoder layers are not compiled
    checkpointing: Checkpointing  # none: gradient checkpointing off; non-reentrant: torch's, as the trainer sets it
    kept_layers: int  # decoder layers that keep their activations (speed.keep_activations_layers, auto resolved)
    optimizer: str  # training.optimizer, auto resolved
    mlp_chunk_tokens: int
    gc_every_steps: int
    generation_weights: str  # bf16: GRPO samples on merged compute-dtype copies (speed/generation.py); nf4: as trained
    memory: str  # speed.memory: fastest, least, or the GiB target the kept layers, offload and optimizer were fit to
    machine: Machine
    shared_prefix: bool = False  # dpo / orpo / simpo: each pair's common prefix runs once (shared_prefix.py)
    shared_prefix_flex: bool = False  # ... with flex attention over a BlockMask (a GPU, sdpa) instead of a dense mask
    skip_padding_mask: bool = False  # sft: the model's training forward gets no attention mask (patches.py)
    notes: tuple[str, ...] = ()  # why a choice differs from what the recipe says

    def as_dict(self) -> dict:
        """The plan as summary.json holds it (JSON types: lists, not tuples)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def describe(self) -> str:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("machine", "notes")}
        lines = ["speed plan:"] + [f"  {key}: {value}" for key, value in fields.items()]
        lines.append("  machine: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in dataclasses.asdict(self.machine).items()))
        return "\n".join(lines + [f"  - {note}" for note in self.notes])


def decide_speed_plan(recipe: Recipe, model_config, machine: Machine, trainable_parameters: int,
                      longest_row: int | None = None, longest_pair: int | None = None,
                      varying_lengths: str | None = None) -> SpeedPlan:
    """Decide every speed choice of this run, log them as one block and return them. `longest_row`: tokens in the
    longest training sequence (data.longest_training_row), which bounds the memory a batch needs; `longest_pair`:
    tokens in the longest pair packed as one row (data.longest_packed_pair), what the decoder runs with
    speed.shared_prefix on, so that is decided before the memory estimates read it; `varying_lengths`: why batches
    come in many lengths (data.varying_batch_lengths), None where every batch has one shape."""
    notes: list[str] = []
    shared_prefix = shares_pair_prefixes(recipe, machine, notes)
    recipe = sized_to_rows(recipe, longest_row, notes)
    recipe = resolve_eager_attention(recipe, model_config, machine, notes, varying_lengths)  # before the estimates
    recipe = resolve_gelu_mlp(recipe, model_config, machine, notes, varying_lengths)  # before the estimates too
    packed = packed_pair_row(shared_prefix, longest_pair, notes)
    recipe = recipe_for_memory_goal(recipe, model_config, machine, trainable_parameters, notes, packed,
                                    cuda_graph_buffers_gib(recipe, model_config, machine, varying_lengths))
    speed = recipe.speed
    fused_lora = speed.fused_lora and not machine.under_fsdp
    if speed.fused_lora and not fused_lora:
        notes.append("fused_lora: off under FSDP (its flattened shards are not bitsandbytes weights); peft's path")
    wants_triton = fused_lora and speed.triton_dequantize and machine.gpus > 0
    if wants_triton and not machine.triton:
        notes.append("triton_dequantize: Triton is not installed; bitsandbytes' kernels")
    graph_gib = cuda_graph_buffers_gib(recipe, model_config, machine, varying_lengths)
    checkpointing, kept = checkpointing_and_kept_layers(recipe, model_config, machine, notes, packed, graph_gib)
    optimizer = choose_optimizer(recipe, trainable_parameters, machine, notes)
    mlp_blocker = fused_mlp_blocker(model_config, recipe.lora.dropout) if fused_lora and speed.fused_mlp else None
    if mlp_blocker:
        notes.append(f"fused_mlp: off, {mlp_blocker}; its projections still take the fused LoRA path")
    fused_mlp = fused_lora and speed.fused_mlp and mlp_blocker is None
    blocker = layer_compile_blocker(recipe, machine, fused_mlp)
    if blocker is None and fused_lora:
        notes.append("fused_lora: inside the compiled layers the LoRA linears run peft's ops, which inductor fuses "
                     "(speed/patches.py, above compiled_training_forward, says why)")
    graphs = choose_cuda_graphs(recipe, model_config, machine, checkpointing, kept, blocker is None,
                                varying_lengths, notes)
    fp8 = choose_fp8_matmul(recipe, machine, wants_triton and machine.triton, blocker is None, notes, graphs)
    liger = liger_kernels_usable(speed, machine, compiled_layers=blocker is None)
    if liger and model_config.model_type not in liger_model_types():
        notes.append(f"liger_kernels: off, liger-kernel has no kernels for model type '{model_config.model_type}' "
                     "(transformers would skip it silently)")
        liger = False
    attention = choose_attention_kernel(speed.attention_kernel, timed_attention(recipe, model_config, machine),
                                        notes, varying_lengths=varying_lengths)
    skip_mask = skips_padding_mask(recipe, model_config, machine, notes)
    plan = SpeedPlan(
        fused_lora=fused_lora, fused_mlp=fused_mlp,
        triton_dequantize=wants_triton and machine.triton, fp8_matmul=fp8, cuda_graphs=graphs,
        cast_adapters_once=not long_context_settings(speed),
        liger_kernels=liger, attention_kernel=attention,
        compile_layers=blocker is None, compile_blocker=blocker, checkpointing=checkpointing, kept_layers=kept,
        optimizer=optimizer, mlp_chunk_tokens=speed.mlp_chunk_tokens, gc_every_steps=speed.gc_every_steps,
        generation_weights=choose_generation_weights(recipe, model_config, machine, notes),
        memory=memory_goal_name(speed.memory), machine=machine, notes=tuple(notes), shared_prefix=shared_prefix,
        skip_padding_mask=skip_mask,
        shared_prefix_flex=shared_prefix and machine.gpus > 0 and recipe.model.attn_implementation == "sdpa")
    log.info("%s", plan.describe())
    return plan


def resolve_eager_attention(recipe: Recipe, model_config, machine: Machine, notes: list[str],
                            varying_lengths: str | None = None) -> Recipe:
    """speed.attention_kernel: auto for eager attention (models without sdpa, as Gemma 2): flex for SFT where every
    batch has one shape and flex_attention_blocker finds nothing against it, else default (eager as loaded). Batches
    of many lengths stay eager: flex's compiled kernels compile again for new lengths (a ragged Gemma-2-9B run on an
    H200 did not finish 8 steps in 90 s, docs/benchmarks.md). Decided before the memory estimates, which count
    eager's scores and not flex's; sdpa attention's auto is decided later, by timing."""
    speed = recipe.speed
    if recipe.model.attn_implementation != "eager" or speed.attention_kernel != "auto" or recipe.method != "sft":
        return recipe
    blocker = flex_attention_blocker(model_config, machine.gpus, machine.processes)
    if not blocker and varying_lengths:
        blocker = f"{varying_lengths}: flex attention compiles again for new lengths"
    if blocker:
        if machine.gpus:
            notes.append(f"attention_kernel: auto -> default, eager attention ({blocker})")
        return with_speed(recipe, attention_kernel="default")
    notes.append("attention_kernel: auto -> flex (eager attention: flex attention computes the same scores without "
                 "keeping rows x heads x length^2 of them a layer; its kernels compile on the first step)")
    return with_speed(recipe, attention_kernel="flex")


def sized_to_rows(recipe: Recipe, longest_row: int | None, notes: list[str]) -> Recipe:
    """The recipe the memory estimates read, sized by the longest training row (memory.rows_of_length); said once."""
    sized = rows_of_length(recipe, longest_row)
    if sized is not recipe:
        notes.append(f"memory estimates for batches of rows up to {longest_row} tokens (the longest training row; "
                     f"training.max_length {recipe.training.max_length})")
    return sized


def packed_pair_row(shared_prefix: bool, longest_pair: int | None, notes: list[str]) -> int | None:
    """The packed row length the memory estimates read (memory.estimate_memory_for_config's packed_pair_row)."""
    if not (shared_prefix and longest_pair):
        return None
    notes.append(f"memory estimates for pairs packed into rows up to {longest_pair} tokens (speed.shared_prefix: "
                 "prompt + chosen + rejected of the longest pair)")
    return longest_pair


def shares_pair_prefixes(recipe: Recipe, machine: Machine, notes: list[str]) -> bool:
    """speed.shared_prefix: `true` shares for the pair methods (dpo, orpo, simpo; validation refuses it for the
    others) with sdpa or eager attention, one process or DDP. `auto` shares where the flex attention path runs in one
    process (a GPU and sdpa), as measured faster (DPO, 8B shape, H200: 1.25x at defaults, docs/methods.md); the
    dense-mask path (CPU, eager) and DDP have no such measurement and stay off."""
    wanted = recipe.speed.shared_prefix
    if not wanted or recipe.method not in PAIRED_METHODS:
        return False
    attention = recipe.model.attn_implementation
    if wanted == "auto" and not (machine.gpus and attention == "sdpa" and machine.processes == 1):
        why = "CPU: a dense mask" if not machine.gpus else f"{attention} attention: a dense mask" \
            if attention != "sdpa" else f"{machine.processes} processes"
        notes.append(f"shared_prefix: auto -> off ({why}, not measured faster; speed.shared_prefix: true turns it on)")
        return False
    if attention not in ("sdpa", "eager"):
        notes.append(f"shared_prefix: off with {attention} (its kernels take no arbitrary mask, which the packed pair "
                     "rows need); sdpa or eager attention share each pair's prefix")
        return False
    if machine.under_fsdp:
        notes.append("shared_prefix: off under FSDP (not checked there); every pair runs both rows in full")
        return False
    if wanted == "auto":
        notes.append("shared_prefix: auto -> on (each pair's common prefix runs once, flex attention on the GPU; "
                     "measured 1.25x on DPO's step; its kernels compile on the first step)")
    return True


def skips_padding_mask(recipe: Recipe, model_config, machine: Machine, notes: list[str]) -> bool:
    """speed.skip_padding_mask resolved: SFT rows that are padded (not packed, not padding-free), a model without
    experts, and for `auto` a GPU. Off without a note where there is nothing to skip (other methods, no padding)."""
    wanted = recipe.speed.skip_padding_mask
    if not wanted or recipe.method != "sft" or recipe.training.packing or recipe.training.padding_free:
        return False
    text = model_config.get_text_config()
    if any((getattr(text, key, None) or 0) > 1 for key in ("num_experts", "num_local_experts", "n_routed_experts")):
        notes.append("skip_padding_mask: off, a mixture-of-experts model (its router loss reads the padding mask)")
        return False
    if wanted == "auto" and not machine.gpus:
        return False
    if wanted == "auto":
        notes.append("skip_padding_mask: auto -> on (right-padded SFT rows, padding out of the loss: attention runs "
                     "causal without a mask)")
    return True


def checkpointing_and_kept_layers(recipe: Recipe, config, machine: Machine, notes: list[str],
                                  packed: int | None = None, graph_gib: float = 0.0) -> tuple[Checkpointing, int]:
    """How checkpointed layers checkpoint, and how many layers keep their activations instead. One process only:
    none of reentrant / offloaded / kept layers has been measured under DDP or FSDP, which keep torch's non-reentrant
    checkpointing of every layer."""
    speed = recipe.speed
    if not recipe.training.gradient_checkpointing:
        return "none", 0
    if machine.processes > 1:
        if adjusts_checkpointing(speed):
            notes.append("reentrant_checkpointing / offload_checkpoints / keep_activations_layers: not applied with "
                         "several processes")
        return "non-reentrant", 0
    mode = "offloaded" if speed.offload_checkpoints else "reentrant" if speed.reentrant_checkpointing else \
        "non-reentrant"
    return mode, layers_to_keep(recipe, config, machine, notes, packed, graph_gib)


def graphs_wanted(speed: SpeedSection) -> bool:
    """speed.cuda_graphs asked for: true, or auto unless speed.memory is least."""
    return speed.cuda_graphs is True or (speed.cuda_graphs == "auto" and speed.memory != "least")


def cuda_graph_buffers_gib(recipe: Recipe, config, machine: Machine, varying_lengths: str | None) -> float:
    """GPU memory speed.cuda_graphs holds beyond what the layers' own activations take, where it may apply: one
    input-gradient buffer per decoder layer (micro-batch tokens x hidden, 2 bytes), kept between micro-batches where
    eager backward frees each after use. 1 GiB on Llama-3-8B at batch 2 x 2,048. 0 where graphs cannot apply."""
    if not graphs_wanted(recipe.speed) or not machine.gpus or cuda_graph_blocker(recipe, machine, varying_lengths):
        return 0.0
    text = config.get_text_config()
    return text.num_hidden_layers * micro_batch_tokens(recipe) * text.hidden_size * 2 / 2**30


def cuda_graph_blocker(recipe: Recipe, machine: Machine, varying_lengths: str | None) -> str | None:
    """Why the decoder layers of this run cannot replay CUDA graphs, whatever their checkpointing or compiling (the
    rest of the decision, choose_cuda_graphs, needs those), or None."""
    if recipe.method != "sft":
        return f"SFT only ({recipe.method}'s batches change shape: pairs and completions padded to their longest)"
    if varying_lengths:
        return f"training batches come in many shapes ({varying_lengths}; training.pad_to_max_length: true gives " \
               "them one)"
    if machine.processes > 1:
        return "several processes (measured in one)"
    if recipe.speed.offload_checkpoints:
        return "offload_checkpoints moves layer inputs to CPU memory during the step"
    if recipe.speed.mlp_chunk_tokens:
        return "mlp_chunk_tokens checkpoints inside the layers"
    if recipe.speed.attention_kernel == "flex":
        return "flex attention (its block mask, rebuilt every batch, is no tensor a graph can read)"
    return None


def resolve_gelu_mlp(recipe: Recipe, model_config, machine: Machine, notes: list[str],
                     varying_lengths: str | None) -> Recipe:
    """speed.fused_mlp for a tanh-GELU-gated MLP (Gemma 2 and 3) under speed.compile_layers: auto. Such layers
    either compile or take the fused MLP and replay CUDA graphs, both measured faster than neither
    (docs/benchmarks.md); where the graphs cannot apply, the MLP is left unfused and the layers compile, as before the
    fused MLP took GELU. Decided before the memory estimates, which count a fused MLP."""
    speed = recipe.speed
    if not (speed.fused_mlp and speed.compile_layers == "auto" and machine.gpus
            and FUSED_GATE_ACTIVATIONS.get(gate_activation_name(model_config.get_text_config())) == "gelu_tanh"):
        return recipe
    blocker = "speed.cuda_graphs is off" if not speed.cuda_graphs else \
        "speed.memory: least" if not graphs_wanted(speed) else cuda_graph_blocker(recipe, machine, varying_lengths)
    if blocker is None:
        return recipe
    notes.append(f"fused_mlp: off, the GELU-gated MLPs fuse where the layers replay CUDA graphs, not here ({blocker}); "
                 "the layers compile instead (speed.compile_layers: false fuses them)")
    return with_speed(recipe, fused_mlp=False)


def adjusts_checkpointing(speed: SpeedSection) -> bool:
    return bool(speed.reentrant_checkpointing or speed.offload_checkpoints or speed.keep_activations_layers)


GPU_MEMORY_SPARE = 0.10  # of the usable GPU memory: left free when speed.keep_activations_layers is auto


def layers_to_keep(recipe: Recipe, config, machine: Machine, notes: list[str], packed: int | None = None,
                   graph_gib: float = 0.0) -> int:
    """speed.keep_activations_layers as a number: `auto` becomes how many layers fit on this GPU now.

    The weights are loaded, so the process sees what it can still use (its memory-fraction cap and other
    processes included). From that, minus 10%, minus the estimated peak with every layer checkpointed, each layer
    that keeps its activations takes the estimated one-layer activations. Both estimates are above what was
    measured at seq 2048 (8B, batch 2: 8.3 vs 7.6 GiB, 0.64 vs 0.46 GiB a layer), so auto errs towards fewer.
    None is kept on CPU, and where the estimate runs low (offloaded checkpoints, chunked MLPs: the long-context
    settings). `graph_gib`: what CUDA graphs would hold on top (cuda_graph_buffers_gib), left out of the budget.
    """
    speed = recipe.speed
    if speed.keep_activations_layers != "auto":
        return speed.keep_activations_layers
    if not machine.gpus or long_context_settings(speed):
        return 0
    estimate = estimate_memory_for_config(recipe, config, packed_pair_row=packed)
    layers = config.get_text_config().num_hidden_layers
    peak = allocated_peak_gib(estimate) + graph_gib
    keep = kept_layers_that_fit(machine.usable_gpu_gib, peak, estimate["each_kept_layer"], layers)
    graphs = f", {graph_gib:.2f} GiB of CUDA graph buffers" if graph_gib else ""
    notes.append(f"keep_activations_layers: auto -> {keep} of {layers} layers keep their activations "
                 f"({machine.usable_gpu_gib:.1f} GiB usable on the GPU, estimated peak {peak:.1f} GiB "
                 f"with every layer checkpointed{graphs}, {estimate['each_kept_layer']:.2f} GiB per kept layer, "
                 f"{100 * GPU_MEMORY_SPARE:.0f}% spare)")
    return keep


def kept_layers_that_fit(usable_gib: float, checkpointed_peak_gib: float, per_layer_gib: float, layers: int) -> int:
    return kept_layers_under(usable_gib * (1 - GPU_MEMORY_SPARE), checkpointed_peak_gib, per_layer_gib, layers)


def kept_layers_under(budget_gib: float, checkpointed_peak_gib: float, per_layer_gib: float, layers: int) -> int:
    headroom = budget_gib - checkpointed_peak_gib
    return max(0, min(layers, int(headroom // per_layer_gib))) if per_layer_gib > 0 else 0


# ------------------------------------------------------------------------------------------------ speed.memory


OFFLOAD_PAYS_SHARE = 0.05  # offloading checkpoints must cut the estimated peak by this share to be worth its copies
EIGHT_BIT_STATE_BYTES, FP32_STATE_BYTES = 2, 8  # AdamW states per adapter parameter (the estimate counts 8-bit)


def memory_goal_name(memory: float | str) -> str:
    return memory if isinstance(memory, str) else f"{memory:g} GiB"


def recipe_for_memory_goal(recipe: Recipe, config, machine: Machine, trainable_parameters: int, notes: list[str],
                           packed: int | None = None, graph_gib: float = 0.0) -> Recipe:
    """speed.memory as the settings it stands for, in a copy of the recipe the rest of the plan reads: `fastest`
    changes nothing (auto kept layers fill 90% of the GPU); `least` checkpoints every layer, offloads the checkpoints
    where that pays and takes 8-bit AdamW for an `auto` optimizer; a number of GiB keeps as many layers as the
    memory estimate puts under it, the CUDA graphs' gradient buffers (`graph_gib`) counted, and takes the `least`
    levers only if every layer checkpointed is still over it."""
    speed, training = recipe.speed, recipe.training
    if speed.memory == "fastest":
        return recipe
    changes: dict = {}
    optimizer = training.optimizer
    if speed.memory == "least":
        changes["keep_activations_layers"] = 0
        if offload_pays(recipe, config, machine, notes, packed):
            changes["offload_checkpoints"] = True
        if optimizer == "auto" and machine.gpus:
            optimizer = "paged_adamw_8bit"
            notes.append("training.optimizer: auto -> paged_adamw_8bit (speed.memory: least; 8-bit states)")
    else:
        optimizer, changes = fit_memory_target(recipe, config, machine, trainable_parameters, notes, packed,
                                               graph_gib)
    return dataclasses.replace(recipe, speed=dataclasses.replace(speed, **changes),
                               training=dataclasses.replace(training, optimizer=optimizer))


def offload_pays(recipe: Recipe, config, machine: Machine, notes: list[str], packed: int | None = None) -> bool:
    """Whether offloading the checkpointed layers' inputs cuts the estimated peak (every layer checkpointed) by at
    least OFFLOAD_PAYS_SHARE: below that the copies cost speed for a saving lost in the allocator's slack. One
    process on a GPU, with gradient checkpointing, only (as speed.offload_checkpoints)."""
    if recipe.speed.offload_checkpoints:
        return True
    if not (recipe.training.gradient_checkpointing and machine.gpus and machine.processes == 1):
        return False
    on_gpu = allocated_peak_gib(estimate_memory_for_config(with_speed(recipe, keep_activations_layers=0), config,
                                                           packed_pair_row=packed))
    offloaded = allocated_peak_gib(estimate_memory_for_config(
        with_speed(recipe, keep_activations_layers=0, offload_checkpoints=True), config, packed_pair_row=packed))
    pays = on_gpu - offloaded >= OFFLOAD_PAYS_SHARE * on_gpu
    notes.append(f"offload_checkpoints: speed.memory: {memory_goal_name(recipe.speed.memory)} -> "
                 f"{'on' if pays else 'off'} (estimated peak {on_gpu:.2f} GiB, {offloaded:.2f} GiB offloaded; on "
                 f"where that saves at least {100 * OFFLOAD_PAYS_SHARE:.0f}%)")
    return pays


def fit_memory_target(recipe: Recipe, config, machine: Machine, trainable_parameters: int, notes: list[str],
                      packed: int | None = None, graph_gib: float = 0.0) -> tuple[str, dict]:
    """(optimizer, speed changes) for speed.memory: N GiB. On a GPU the target is also held to 90% of what this
    process can use, as `auto` kept layers are. `graph_gib`: the CUDA graphs' gradient buffers, allocated memory on
    top of the estimate (a target that left them out was overshot: docs/benchmarks.md)."""
    target = float(recipe.speed.memory)
    optimizer = recipe.training.optimizer
    if not (recipe.training.gradient_checkpointing and machine.gpus and machine.processes == 1):
        notes.append(f"speed.memory: {target:g} GiB: no kept layers to fit (needs gradient checkpointing, a GPU and "
                     "one process); every layer as configured")
        return optimizer, {"keep_activations_layers": 0}  # validation left it auto
    budget = min(target, machine.usable_gpu_gib * (1 - GPU_MEMORY_SPARE))
    chosen = choose_optimizer(recipe, trainable_parameters, machine, [])
    states_gib = 0.0 if "8bit" in chosen else trainable_parameters * (FP32_STATE_BYTES - EIGHT_BIT_STATE_BYTES) / 2**30
    estimate = estimate_memory_for_config(with_speed(recipe, keep_activations_layers=0), config, packed_pair_row=packed)
    peak = allocated_peak_gib(estimate) + states_gib + graph_gib
    if peak > budget and optimizer == "auto" and states_gib:
        optimizer, peak = "paged_adamw_8bit", peak - states_gib
        notes.append(f"training.optimizer: auto -> paged_adamw_8bit (speed.memory: {target:g} GiB; 8-bit states)")
    layers = config.get_text_config().num_hidden_layers
    changes: dict = {}
    if graph_gib and peak > budget >= peak - graph_gib and recipe.speed.cuda_graphs == "auto":
        peak, graph_gib, changes["cuda_graphs"] = peak - graph_gib, 0.0, False
        notes.append(f"cuda_graphs: auto -> off, speed.memory: {target:g} GiB leaves no room for their gradient "
                     "buffers with every layer checkpointed (speed.cuda_graphs: true takes them)")
    if peak <= budget:
        keep = 0 if long_context_settings(recipe.speed) else kept_layers_under(
            budget, peak, estimate["each_kept_layer"], layers)
        graphs = f", {graph_gib:.2f} GiB of CUDA graph buffers among it" if graph_gib else ""
        notes.append(f"keep_activations_layers: speed.memory: {target:g} GiB -> {keep} of {layers} layers keep "
                     f"their activations (estimated peak {peak:.1f} GiB with every layer checkpointed{graphs}, "
                     f"{estimate['each_kept_layer']:.2f} GiB per kept layer, budget {budget:.1f} GiB)")
        return optimizer, {**changes, "keep_activations_layers": keep}
    changes = {"keep_activations_layers": 0}
    if offload_pays(recipe, config, machine, notes, packed):
        changes["offload_checkpoints"] = True
        peak = allocated_peak_gib(estimate_memory_for_config(with_speed(recipe, **changes), config,
                                                             packed_pair_row=packed))
    if peak > budget:
        notes.append(f"speed.memory: {target:g} GiB: the estimated peak is {peak:.1f} GiB even with every layer "
                     "checkpointed; training goes on, but lower training.batch_size or training.max_length to fit")
    return optimizer, changes


def with_speed(recipe: Recipe, **changes) -> Recipe:
    return dataclasses.replace(recipe, speed=dataclasses.replace(recipe.speed, **changes))


def layer_compile_blocker(recipe: Recipe, machine: Machine, fused_mlp: bool = False) -> str | None:
    """Why speed.compile_layers does not apply in this process, or None when it does. `auto` compiles where it was
    measured faster (H200, docs/benchmarks.md): SFT layers whose MLP qlora-kit does not fuse (Gemma's GELU-gated
    MLPs where CUDA graphs cannot apply, resolve_gelu_mlp), rows of one length or many (a second length compiles
    once more, with the length dynamic). Not where the MLP is fused (SwiGLU: no faster, more memory), or for the
    other methods (not measured). With LoRA dropout the MLP is never fused, so every family compiles: 1.15x
    (Mistral-7B) and 1.37x (Gemma-3-4B) over the same recipe uncompiled, and a recomputed compiled layer draws the
    same masks (checked on an H200)."""
    speed = recipe.speed
    if not speed.compile_layers:
        return "switched off"
    if speed.compile_layers == "auto" and recipe.method != "sft":
        return f"auto: off for {recipe.method} (measured on SFT only; speed.compile_layers: true compiles)"
    if speed.compile_layers == "auto" and fused_mlp:
        return "auto: off, the MLPs are fused (compiled layers measured no faster there)"
    if not machine.gpus:
        return "off on CPU (no GPU here)"
    if speed.offload_checkpoints or speed.reentrant_checkpointing or speed.mlp_chunk_tokens:
        return "off with offload_checkpoints, reentrant_checkpointing or mlp_chunk_tokens"
    if machine.processes > 1:
        return "off with several processes"
    return None


def choose_fp8_matmul(recipe: Recipe, machine: Machine, triton_dequantize: bool, compiled_layers: bool,
                      notes: list[str], cuda_graphs: bool = False) -> bool:
    """speed.fp8_matmul for this run: the fused layers' big matmuls in float8 (speed/fp8.py). They run where the
    fused layers dequantize through qlora-kit's kernel, in bf16, on a GPU that runs torch's rowwise-scaled float8
    matmul (Machine.float8), and outside compiled layers (those run peft's ops). `auto` takes it on Hopper GPUs
    (where it was measured) for micro-batches of FP8_MIN_TOKENS tokens or more, or FP8_MIN_TOKENS_GRAPHED where the
    layers replay CUDA graphs: without graphs, smaller micro-batches wait on the host's launches, and the casts'
    launches cost more than the faster matmuls give back (docs/benchmarks.md); `true` wherever it runs, and says
    why where it cannot."""
    setting = recipe.speed.fp8_matmul
    if not setting or not machine.gpus:
        return False
    if not triton_dequantize:
        blocker = "needs fused_lora and triton_dequantize (Triton installed)"
    elif recipe.quantization.compute_dtype not in ("auto", "bf16"):  # auto: bf16 on every GPU with float8
        blocker = f"needs bf16 compute (quantization.compute_dtype: {recipe.quantization.compute_dtype})"
    elif not machine.float8:
        blocker = (f"this GPU (compute capability {machine.capability}) or torch {torch.__version__} does not run "
                   "rowwise-scaled float8 matmuls (tried when training starts)")
    elif setting == "auto" and machine.capability[0] != 9:
        notes.append(f"fp8_matmul: auto -> off, measured on Hopper GPUs only (compute capability "
                     f"{machine.capability}; speed.fp8_matmul: true takes it)")
        return False
    elif compiled_layers:
        blocker = "the decoder layers compile, and compiled layers run peft's ops (speed.compile_layers: false to " \
                  "take float8 instead)"
    elif setting == "auto" and micro_batch_tokens(recipe) < (FP8_MIN_TOKENS_GRAPHED if cuda_graphs else FP8_MIN_TOKENS):
        notes.append(f"fp8_matmul: auto -> off, {micro_batch_tokens(recipe):,} tokens a micro-batch (float8 measured "
                     f"faster from {FP8_MIN_TOKENS:,} tokens, or from {FP8_MIN_TOKENS_GRAPHED:,} where the layers "
                     f"replay CUDA graphs, {'as here' if cuda_graphs else 'not here'}; speed.fp8_matmul: true takes "
                     "it)")
        return False
    else:
        notes.append("fp8_matmul: the frozen weights' matmuls run in float8 (rowwise-scaled e4m3, fp32 "
                     "accumulation); speed.fp8_matmul: false keeps them in bf16")
        return True
    if setting is True:
        notes.append(f"fp8_matmul: off, {blocker}")
    return False


def choose_cuda_graphs(recipe: Recipe, config, machine: Machine, checkpointing: Checkpointing, kept: int,
                       compiled_layers: bool, varying_lengths: str | None, notes: list[str]) -> bool:
    """speed.cuda_graphs for this run (speed/cuda_graphs.py): SFT on one GPU where every batch has one shape, the
    layers run eagerly (not compiled, no flex attention), checkpointed layers keep their inputs on the GPU, and no
    layer that recomputes draws random numbers (LoRA or attention dropout: the backward graph's recompute would
    draw another mask than the forward graph did). `auto` also leaves them off under speed.memory: least (their
    gradient buffers cost memory); a note says why where they do not apply."""
    if not recipe.speed.cuda_graphs or not machine.gpus:
        return False
    if not graphs_wanted(recipe.speed):
        notes.append("cuda_graphs: auto -> off, speed.memory: least (the graphs keep a gradient buffer per layer; "
                     "speed.cuda_graphs: true takes them)")
        return False
    layers = config.get_text_config().num_hidden_layers
    recomputes = checkpointing != "none" and kept < layers
    dropout = recipe.lora.dropout > 0 or (getattr(config.get_text_config(), "attention_dropout", 0) or 0) > 0
    blocker = cuda_graph_blocker(recipe, machine, varying_lengths)  # offload_checkpoints among them
    if blocker is None and compiled_layers:
        blocker = "the decoder layers compile (speed.compile_layers: false to take graphs instead)"
    elif blocker is None and recomputes and dropout:
        blocker = "dropout in layers that recompute (the recompute would draw another mask)"
    if blocker is None:
        notes.append("cuda_graphs: decoder layers replay CUDA graphs of their forward and backward (captured on "
                     "the second micro-batch of a shape); speed.cuda_graphs: false runs them eagerly")
        return True
    notes.append(f"cuda_graphs: off, {blocker}")
    return False


def micro_batch_tokens(recipe: Recipe) -> int:
    """Tokens one micro-batch runs through the decoder at most: batch x the longest row (the recipe sized to the
    rows, sized_to_rows), twice over for the pair methods (chosen and rejected)."""
    rows = recipe.training.batch_size * (2 if recipe.method in PAIRED_METHODS else 1)
    return rows * recipe.training.max_length


def liger_kernels_usable(speed: SpeedSection, machine: Machine, compiled_layers: bool = False) -> bool:
    """speed.liger_kernels on a GPU with liger-kernel installed (its Triton kernels have no CPU path), unless the
    decoder layers are compiled: the compiled graph fuses norms, RoPE and SwiGLU itself."""
    if not speed.liger_kernels or not machine.gpus or compiled_layers:
        return False
    if not machine.liger:
        log.warning("speed.liger_kernels: liger-kernel is not installed; training without its kernels (pip install "
                    "liger-kernel, or set speed.liger_kernels: false to silence this)")
        return False
    return True


@functools.cache
def liger_model_types() -> frozenset[str]:
    """The model types liger-kernel patches: the table transformers' `use_liger_kernel` looks the model up in
    (liger_kernel.transformers._apply_liger_kernel_to_instance, liger-kernel 0.8.5), which skips any other type with
    an info-level log line only. Imported only where Liger would run (a GPU with liger-kernel installed)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def choose_generation_weights(recipe: Recipe, config, machine: Machine, notes: list[str]) -> str:
    """speed.generation_weights for this run: bf16 (GRPO samples on merged compute-dtype copies of the 4-bit LoRA
    layers, speed/generation.py) or nf4 (on the layers as they train). `auto` takes bf16 on a GPU where GRPO's
    estimated peak while sampling, copies included, fits the budget speed.memory sets (90% of the GPU for fastest,
    the target in GiB, held to that too); never under speed.memory: least, FSDP or LoRA dropout (validation refuses
    an explicit bf16 with dropout)."""
    chosen = recipe.speed.generation_weights
    if recipe.method != "grpo" or not recipe.quantization.load_in_4bit:
        return "nf4"  # nothing samples on 4-bit weights (validation refuses bf16 here)
    if machine.under_fsdp:
        if chosen != "nf4":
            notes.append(f"generation_weights: {chosen} -> nf4 (FSDP: each process holds shards of the 4-bit "
                         "weights, not layers to copy)")
        return "nf4"
    if chosen != "auto":
        return chosen
    why = None
    if not machine.gpus:
        why = "CPU: no GPU memory estimate to fit the copies in"
    elif recipe.lora.dropout:
        why = f"lora.dropout {recipe.lora.dropout:g}: trl samples in train mode, and a merged weight has no dropout"
    elif recipe.speed.memory == "least":
        why = "speed.memory: least; the copies would add to the peak"
    if why:
        notes.append(f"generation_weights: auto -> nf4 ({why})")
        return "nf4"
    parts = estimate_memory_for_config(recipe, config)
    peak = generation_peak_gib(parts, with_copy=True)
    budget = machine.usable_gpu_gib * (1 - GPU_MEMORY_SPARE)
    if recipe.speed.memory != "fastest":
        budget = min(budget, float(recipe.speed.memory))
    weights = "bf16" if peak <= budget else "nf4"
    notes.append(f"generation_weights: auto -> {weights} (estimated peak while sampling {peak:.1f} GiB with "
                 f"{parts['generation_copy']:.1f} GiB of merged copies, budget {budget:.1f} GiB)")
    return weights


FUSED_ADAMW_STATE_LIMIT_GIB = 1.0


def choose_optimizer(recipe: Recipe, trainable_parameters: int, machine: Machine, notes: list[str]) -> str:
    """auto: on GPU, torch's fused AdamW while its fp32 states stay under 1 GiB (an 8B model's r=16 adapter: 0.3 GiB;
    one kernel for all tensors, where bitsandbytes' paged 8-bit AdamW launches several per tensor and cost 23% of
    an 8B step on an H200), else paged 8-bit AdamW (70B adapters: 1.7 GiB of fp32 states); adamw_torch on CPU."""
    if recipe.training.optimizer != "auto":
        return recipe.training.optimizer
    state_gib = trainable_parameters * 8 / 2**30
    if not machine.gpus:
        chosen, why = "adamw_torch", "CPU"
    elif state_gib <= FUSED_ADAMW_STATE_LIMIT_GIB:
        chosen, why = "adamw_torch_fused", f"fp32 optimizer states {state_gib:.2f} GiB"
    else:
        chosen, why = "paged_adamw_8bit", f"fp32 optimizer states would take {state_gib:.1f} GiB"
    notes.append(f"training.optimizer: auto -> {chosen} ({why})")
    return chosen


def timed_attention(recipe: Recipe, model_config, machine: Machine) -> AttentionShape | None:
    """The attention call whose kernels speed.attention_kernel: auto times: sdpa on a GPU, at the training batch
    (chosen and rejected rows together for paired methods) and the longest training row."""
    if not machine.gpus or not torch.cuda.is_available() or recipe.model.attn_implementation != "sdpa":
        return None
    rows = recipe.training.batch_size * (2 if recipe.method in PAIRED_METHODS else 1)
    dtype = model_config.dtype if getattr(model_config, "dtype", None) in (torch.float16, torch.bfloat16) else (
        torch.bfloat16 if machine.capability and machine.capability >= (8, 0) else torch.float16)
    return AttentionShape.of(model_config, rows, recipe.training.max_length, dtype)


def apply_speed_plan(model, plan: SpeedPlan) -> None:
    """Apply the plan to a model the trainer has set up (checkpointing switched on); says what it did. (The
    process-wide attention kernel is ApplySpeedPlan's: it is undone when training ends.)"""
    if plan.fused_lora:
        log.info("speed.fused_lora: %d LoRA layers over 4-bit weights fused", use_fused_lora(
            model, cast_adapters_once=plan.cast_adapters_once, triton_dequantize=plan.triton_dequantize,
            fp8_matmul=plan.fp8_matmul))
        if plan.fp8_matmul:
            log.info("speed.fp8_matmul: %d of them multiply their frozen weight in float8 (the rest are narrower "
                     "than %d)", sum(getattr(m, "_fp8_matmul", False) for m in model.modules()), FP8_MIN_WIDTH)
        if plan.triton_dequantize:
            log.info("speed.triton_dequantize: NF4 weights dequantize through qlora-kit's Triton kernel")
        if plan.fused_mlp:
            log.info("speed.fused_mlp: %d gated MLPs recompute act(gate) * up in backward", use_fused_mlp(model))
    if plan.compile_layers:
        cache = persistent_compile_cache()
        log.info("speed.compile_layers: %d decoder layers compile on their first training step (kernels kept in %s)",
                 compile_decoder_layers(model), cache)
    if plan.mlp_chunk_tokens:
        log.info("speed.mlp_chunk_tokens: %d MLPs run over chunks of %d tokens",
                 chunk_mlps(model, plan.mlp_chunk_tokens), plan.mlp_chunk_tokens)
    if plan.shared_prefix:
        share_pair_prefixes(model)
        if plan.shared_prefix_flex:
            use_flex_attention_for_pairs(model)
        log.info("speed.shared_prefix: each pair's common prefix runs once (%s)",
                 "flex attention over a block mask" if plan.shared_prefix_flex else "a dense attention mask")
    swapped, still = apply_checkpointing(model, plan)
    if plan.cuda_graphs:
        graphs = use_cuda_graphs(model)
        log.info("speed.cuda_graphs: %d decoder layers replay CUDA graphs once a batch shape repeats",
                 0 if graphs is None else len(graphs.layers))
    if plan.checkpointing == "offloaded":
        log.info("speed.offload_checkpoints: %d checkpointed layers keep their inputs in CPU memory", swapped)
    elif plan.checkpointing == "reentrant":
        log.info("speed.reentrant_checkpointing: %d layers checkpointed without a graph in their first forward",
                 swapped)
    if plan.kept_layers:
        log.info("speed.keep_activations_layers: %d layers keep their activations, %d are recomputed",
                 plan.kept_layers, still)


def persistent_compile_cache() -> str:
    """Where torch.compile keeps the kernels it compiles: TORCHINDUCTOR_CACHE_DIR if set, else qlora-kit's cache
    folder, so they survive the reboots that empty torch's default (/tmp/torchinductor_USER) and a second run of the
    shape starts with them. Triton's own cache (our NF4 kernel, Liger's) is under ~/.triton already."""
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "torchinductor"))


def apply_checkpointing(model, plan: SpeedPlan) -> tuple[int, int]:
    """The checkpointing part of the plan, on a model whose checkpointing the trainer has just switched on: the
    checkpoint function, then the kept layers. Returns (layers given the plan's function, layers still recomputed).
    Also what a trainer that switches checkpointing on again mid-training (trl's DPO/KTO reference pass) re-applies."""
    swapped = 0
    if plan.checkpointing == "offloaded":
        swapped = use_checkpoint_function(model, offloaded_checkpoint)
    elif plan.checkpointing == "reentrant":
        swapped = use_checkpoint_function(model, reentrant_checkpoint)
    still = keep_activations(model, plan.kept_layers) if plan.kept_layers else 0
    return swapped, still


def checkpointing_was_reset(model, plan: SpeedPlan) -> bool:
    """Whether `gradient_checkpointing_enable` ran again since the plan was applied: every layer checkpoints again
    though the plan keeps some, or the layers checkpoint with transformers' function instead of the plan's."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers or not any(layer.gradient_checkpointing for layer in layers):
        return False  # checkpointing is off, or every layer keeps its activations
    function = {"offloaded": offloaded_checkpoint, "reentrant": reentrant_checkpoint}.get(plan.checkpointing)
    return bool(plan.kept_layers and layers[-1].gradient_checkpointing) or (
        function is not None and layers[0]._gradient_checkpointing_func is not function)


class ApplySpeedPlan(TrainerCallback):
    """Applies the plan when training starts: after whatever the trainer does to the model first. transformers
    applies Liger's kernels in `train()` (5.17 and 5.24), and Liger's SwiGLU would replace a fused or chunked MLP
    forward installed any earlier; the trainer also switches checkpointing on there, which the plan then adjusts."""

    def __init__(self, plan: SpeedPlan) -> None:
        self.plan = plan
        self.gc_scheduled = False
        self.cudnn_attention_before: bool | None = None
        self.eager_attention: tuple | None = None  # (model, its implementation) while flex attention stands in
        self.graphs = None  # the model's LayerGraphs under speed.cuda_graphs

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.cudnn_attention_before = apply_attention_kernel(self.plan.attention_kernel)
        if self.plan.attention_kernel == "flex":
            persistent_compile_cache()  # flex attention's kernels are compiled: kept for the next run of the shape
            self.eager_attention = (model, set_attention_implementation(model, FLEX))
            log.info("speed.attention_kernel: flex attention runs the model's %s attention while it trains",
                     self.eager_attention[1])
        apply_speed_plan(model, self.plan)
        self.graphs = model_graphs(model) if self.plan.cuda_graphs else None
        if self.plan.gc_every_steps:
            schedule_python_gc()
            self.gc_scheduled = True

    def on_optimizer_step(self, args, state, control, **kwargs):
        forget_compute_copies()  # the adapter weights changed
        if self.graphs is not None:
            self.graphs.forget_pending()

    def on_step_end(self, args, state, control, **kwargs):
        if self.plan.gc_every_steps and state.global_step % self.plan.gc_every_steps == 0:
            gc.collect(1)

    def on_train_end(self, args, state, control, **kwargs):
        self.restore_process_settings()

    def restore_process_settings(self) -> None:
        """Python's own collection schedule and PyTorch's attention kernels again, if training changed them (also
        run when training ends with an error, which skips on_train_end)."""
        restore_attention_kernel(self.cudnn_attention_before)
        self.cudnn_attention_before = None
        if self.graphs is not None:  # their memory is the merge's and export's now
            self.graphs.drop()
        if self.eager_attention is not None:
            set_attention_implementation(*self.eager_attention)
            self.eager_attention = None
        if self.gc_scheduled:
            gc.unfreeze()
            gc.enable()
            self.gc_scheduled = False


def schedule_python_gc() -> None:
    """speed.gc_every_steps: everything alive now (model, libraries) leaves the collector's view, and automatic
    collections stop; `ApplySpeedPlan` collects the young generations every N steps instead."""
    gc.collect()
    gc.freeze()
    gc.disable()
