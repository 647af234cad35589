"""Peak GPU memory of a recipe, estimated from the model's config alone (no weights): `qlora-kit data`, the auto
choices of the speed plan (kept layers) and scripts/recipe_memory_table.py read it."""

from __future__ import annotations

import dataclasses

import torch
from transformers import AutoModelForCausalLM

from qlora_kit.model import (
    DTYPES,
    fused_mlp_blocker,
    mlp_gate_activation,
    model_config,
    targets_module,
    upcasts_to_fp32,
)
from qlora_kit.recipe import PAIRED_METHODS, Recipe, SpeedSection

ESTIMATE_DTYPES = {**DTYPES, "auto": torch.bfloat16}  # the estimate is for a GPU; auto picks bf16 on every recent one
LOGIT_BYTES = 4  # calibrated on H100 runs of this pipeline; see scripts/recipe_memory_table.py
# the CUDA context and library workspaces, outside torch's allocator: neither torch.cuda.max_memory_allocated (the
# peak qlora-kit reports and a speed.memory target means) nor the free memory the speed plan reads after loading
# includes it; the allocator's slack is in the allocated peak. Split from one 1 GiB term on the H200 rows of
# 2026-11-30, whose allocated peaks with every layer checkpointed sat 0.7-1.1 GiB under it (docs/benchmarks.md)
CUDA_CONTEXT_GIB, ALLOCATOR_SLACK_GIB = 0.75, 0.25
# hidden-sized compute-dtype tensors a kept Llama-style layer saves for backward besides its MLP's intermediates (two
# norms' inputs and outputs, q / k / v / attention output at GQA widths, projection inputs): fitted to the H200
# kept-layer costs of Llama-3-8B (SFT and DPO), Mistral-7B and Qwen3-8B, each within 5% (docs/benchmarks.md, "Memory
# estimate"); layers with more norms save more (norm_saved_width)
LAYER_HIDDEN_WIDE = 6
# the linears that read the attention's output (saved by the attention kernel itself): their dropped copy is extra
ATTENTION_OUTPUT_LINEARS = ("o_proj", "out_proj", "dense")


# estimate parts that are not GPU training-peak terms (GRPO's sampling: see generation_peak_gib)
NOT_IN_TOTAL = ("cpu_offloaded_checkpoints", "each_kept_layer", "generation_kv_cache", "generation_copy")


def estimate_training_memory(recipe: Recipe, folder: str, packed_pair_row: int | None = None) -> dict[str, float]:
    """Rough peak GPU memory (GiB) of training `recipe` on the model whose config.json is in `folder`; see
    estimate_memory_for_config."""
    return estimate_memory_for_config(recipe, model_config(recipe, folder), packed_pair_row)


def rows_of_length(recipe: Recipe, longest_row: int | None) -> Recipe:
    """`recipe` with training.max_length lowered to the longest training row, for the estimate only: it assumes
    rows of max_length, but no batch is longer than the longest row, and data is often much shorter (then the speed
    plan keeps layers that fit, and the dry run shows the peak the run will have). The trainer keeps max_length."""
    if not longest_row or longest_row >= recipe.training.max_length:
        return recipe
    return dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, max_length=longest_row))


LARGEST_GPU_GIB = 192  # about the memory of the largest single GPU sold today


def memory_warning(total_gib: float) -> str | None:
    """A loud line when the estimate cannot fit: more than every GPU here has, or than any single GPU made."""
    if torch.cuda.is_available():
        largest = max(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
        limit = largest / 2**30
        what = f"the largest GPU here ({torch.cuda.get_device_name()}, {limit:.0f} GiB)"
    else:
        limit, what = LARGEST_GPU_GIB, f"any single GPU made today (about {LARGEST_GPU_GIB} GiB)"
    if total_gib <= limit:
        return None
    return (f"WARNING: the estimated peak of {total_gib:,.1f} GiB is more than {what}: training would run out of "
            "memory. Lower training.batch_size, training.max_length or lora.r, or shard the model over several GPUs "
            "(FSDP)")


def estimate_memory_for_config(recipe: Recipe, config, packed_pair_row: int | None = None) -> dict[str, float]:
    """Rough peak GPU memory (GiB) from the model config alone: no weights are read.

    4-bit linears at ~0.52 byte/param (NF4 + double-quantized absmax); other params in fp32, as
    prepare_model_for_kbit_training casts them (compute dtype with quantization.upcast_to_fp32: false); LoRA weights +
    grads in fp32, 8-bit Adam states and (fused LoRA) the weights' compute-dtype copies; activations with checkpointing
    = each layer's input plus one layer's recomputation; the full logits only where training holds them
    (full_logits_held), at LOGIT_BYTES per value (one fp32 copy alive at the peak, calibrated on H100 runs when trl
    still held them: within 1% of the measured 8B-shape peak, ~2 GiB over the 1B one); ~1 GiB of CUDA context (not in
    torch's allocated peak: allocated_peak_gib) and allocator slack. Full max_length rows: the worst case. With
    speed.offload_checkpoints the layer inputs are host memory, returned as `cpu_offloaded_checkpoints` and left out
    of the total; `each_kept_layer` is what one more layer under speed.keep_activations_layers would add (`auto`
    counts as none here). At very long rows the one-layer term is low: the 350k-token 8B step peaked at 68.85 GiB
    (scripts/bench_results), where this says 38.7. Pair methods (dpo, orpo, simpo) count chosen and rejected rows:
    twice the batch. `packed_pair_row`: with speed.shared_prefix on, tokens of the longest packed pair (prompt + chosen
    + rejected); the decoder then runs one such row per pair (activations), while the logits stay on the two unpacked
    rows.
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    model.tie_weights()  # from_config on the meta device leaves tied heads untied: counted twice otherwise
    text = config.get_text_config()
    linear = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    head = model.get_output_embeddings()
    quantized = sum(m.weight.numel() for m in linear.values() if m is not head)
    total = sum(p.numel() for p in model.parameters())
    targets = recipe.lora.target_modules
    adapted_by_name = {n: m for n, m in linear.items()
                       if m is not head and (targets == "all-linear" or targets_module(n, targets))}
    adapted = list(adapted_by_name.values())
    lora = sum(recipe.lora.r * (m.in_features + m.out_features) for m in adapted)
    t = recipe.training
    # dpo / orpo / simpo run chosen and rejected as one batch of twice the rows (the reference pass keeps no graph)
    tokens = t.batch_size * t.max_length * (2 if recipe.method in PAIRED_METHODS else 1)
    logit_tokens = tokens
    rows, row_length = tokens // t.max_length, t.max_length
    if packed_pair_row and recipe.method in PAIRED_METHODS:  # never longer than the two rows it packs
        rows, row_length = t.batch_size, min(packed_pair_row, 2 * t.max_length)
        tokens = rows * row_length
    compute_dtype = ESTIMATE_DTYPES[recipe.quantization.compute_dtype]
    bytes_act = compute_dtype.itemsize
    layer_input = tokens * text.hidden_size * bytes_act
    mlp_tokens = min(tokens, recipe.speed.mlp_chunk_tokens or tokens)  # speed.mlp_chunk_tokens: one chunk at a time
    mlp_wide = 2 if fused_mlp_applies(recipe, model, adapted) else 4  # gate, up (and act(gate), act(gate) * up)
    one_layer = (tokens * (LAYER_HIDDEN_WIDE + norm_saved_width(model, text)) * text.hidden_size +
                 mlp_tokens * mlp_wide * getattr(text, "intermediate_size", 4 * text.hidden_size)) * bytes_act
    one_layer += eager_attention_scores(recipe, text, rows, row_length) * (4 + 2 * bytes_act)
    one_layer += tokens * lora_dropout_bytes_per_token(recipe, adapted_by_name, bytes_act) / text.num_hidden_layers
    kept = recipe.speed.keep_activations_layers
    kept = 0 if kept == "auto" else min(kept, text.num_hidden_layers)  # auto: decided on the GPU
    checkpointed_inputs = (text.num_hidden_layers - kept) * layer_input
    offloaded = t.gradient_checkpointing and recipe.speed.offload_checkpoints
    if not t.gradient_checkpointing:
        activations = one_layer * text.num_hidden_layers
    elif offloaded:  # the checkpointed inputs wait in CPU memory; one is back on the GPU for its recompute
        activations = layer_input + one_layer * (1 + kept)
    else:
        activations = checkpointed_inputs + one_layer * (1 + kept)
    bits = 0.516 if recipe.quantization.load_in_4bit else 1.0 if recipe.quantization.load_in_8bit else bytes_act
    gib = 2**30
    parts = {
        "quantized_weights": quantized * bits / gib,
        "other_weights": (total - quantized) * (4 if upcasts_to_fp32(recipe, compute_dtype) else bytes_act) / gib,
        "lora_weights_grads_optimizer": lora * (4 + 4 + 2 + compute_copy_bytes(recipe, compute_dtype)) / gib,
        "activations": activations / gib,
        "logits": logit_tokens * text.vocab_size * (LOGIT_BYTES if full_logits_held(recipe) else 0) / gib,
        "cuda_context": CUDA_CONTEXT_GIB,
        "allocator_slack": ALLOCATOR_SLACK_GIB,
    }
    parts["total"] = sum(parts.values())
    parts["cpu_offloaded_checkpoints"] = checkpointed_inputs / gib if offloaded else 0.0  # host RAM
    parts["each_kept_layer"] = one_layer / gib if t.gradient_checkpointing else 0.0  # speed.keep_activations_layers
    sampling = recipe.method == "grpo"  # every completion of an optimizer step in one generate call (trl's default)
    completions = t.batch_size * t.gradient_accumulation_steps
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    kv_cache = completions * t.max_length * text.num_hidden_layers * 2 * kv_heads * head_dim * bytes_act
    parts["generation_kv_cache"] = kv_cache / gib if sampling else 0.0
    copied = sum(m.weight.numel() for m in adapted) if recipe.quantization.load_in_4bit else 0
    parts["generation_copy"] = copied * bytes_act / gib if sampling else 0.0  # speed.generation_weights: bf16
    return parts


def allocated_peak_gib(parts: dict[str, float]) -> float:
    """The estimate in torch's allocated terms (torch.cuda.max_memory_allocated, the peak qlora-kit reports): what the
    speed plan holds against the free memory it reads after loading and against a speed.memory target."""
    return parts["total"] - parts["cuda_context"]


def generation_peak_gib(parts: dict[str, float], with_copy: bool) -> float:
    """GRPO's peak while it samples, from estimate_memory_for_config's parts: the weights, the adapter with its
    gradients and optimizer states, the KV cache of the step's completions at full length, CUDA's overhead and (with
    speed.generation_weights: bf16) the merged compute-dtype copies; no training activations or logits are alive
    then. The step's training peak comes at another moment and reuses the memory."""
    held = ("quantized_weights", "other_weights", "lora_weights_grads_optimizer", "cuda_context", "allocator_slack",
            "generation_kv_cache")
    return sum(parts[key] for key in held) + (parts["generation_copy"] if with_copy else 0.0)


def full_logits_held(recipe: Recipe) -> bool:
    """Whether training holds the [rows, length, vocabulary] logits. trl 1.16's trainers take every method's
    log-probs from their fused LM head, in tiles (SFT, DPO, KTO, GRPO; ORPO and SimPO through
    trainers.ChunkedPairLogProbs), with or without Liger; only SFT's label smoother reads the full logits."""
    return recipe.method == "sft" and bool(recipe.training.sft_args.get("label_smoothing_factor"))


def eager_attention_scores(recipe: Recipe, text_config, rows: int, row_length: int) -> int:
    """Attention scores one layer keeps for backward under model.attn_implementation: eager (Gemma 2's recipe: sdpa
    has no softcapping): rows x heads x row_length^2, each saved as the softmax's fp32 output plus two compute-dtype
    copies (the softcap's tanh, the probabilities the value matmul reads). The fused kernels keep none, nor does
    flex attention standing in for eager (speed.attention_kernel: flex)."""
    if recipe.model.attn_implementation != "eager" or recipe.speed.attention_kernel == "flex":
        return 0
    return rows * text_config.num_attention_heads * row_length ** 2


def lora_dropout_bytes_per_token(recipe: Recipe, adapted: dict[str, torch.nn.Linear], bytes_act: int) -> int:
    """What lora.dropout adds to the activations the model's layers save, per token (all layers): each adapted
    linear then saves its own dropped input (compute dtype) and dropout's mask (a byte an element on CUDA), where
    without dropout the linears of one module that read one input (q / k / v, gate / up, the down projection alone)
    save it once and the attention output projection's input is the attention's own saved output. Gemma-3-4B at
    batch 2 x 2,048 (H200): 0.17 GiB a layer, as measured (dropout 0.05 against none, every layer kept)."""
    if not recipe.lora.dropout:
        return 0
    widths = sum(m.in_features for m in adapted.values())
    shared = {(name.rpartition(".")[0], m.in_features) for name, m in adapted.items()
              if name.rpartition(".")[2] not in ATTENTION_OUTPUT_LINEARS}
    return widths * (bytes_act + 1) - sum(width for _, width in shared) * bytes_act


def compute_copy_bytes(recipe: Recipe, compute_dtype: torch.dtype) -> int:
    """Bytes per adapter parameter of the compute-dtype copies the fused LoRA layers keep between optimizer steps."""
    fused = recipe.speed.fused_lora and recipe.quantization.load_in_4bit and not long_context_settings(recipe.speed)
    return compute_dtype.itemsize if fused and compute_dtype != torch.float32 else 0


def norm_saved_width(model, text_config) -> float:
    """Hidden widths a decoder layer's norms save for backward beyond the two of a Llama layer (LAYER_HIDDEN_WIDE):
    each further hidden-wide norm saves its input (Gemma 2 and 3 also normalise the attention and MLP outputs:
    four), and q_norm / k_norm save the q and k projections' outputs (Qwen3, Gemma 3); measured against Gemma-3-4B's
    kept layers in docs/benchmarks.md."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layer = next((m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)), None)
    if layer is None:
        return 0.0
    modules = dict(layer.named_modules())
    hidden, norms, widths = text_config.hidden_size, 0, 0
    for name, module in modules.items():
        weight = getattr(module, "weight", None)
        if not type(module).__name__.endswith(("RMSNorm", "LayerNorm")) or weight is None:
            continue
        projection = modules.get(name[:-4] + "proj") if name.endswith(("q_norm", "k_norm")) else None
        if isinstance(projection, torch.nn.Linear):  # self_attn.q_norm normalises self_attn.q_proj's output
            widths += projection.out_features
        elif weight.numel() == hidden:
            norms += 1
    return (max(norms - 2, 0) * hidden + widths) / hidden


def fused_mlp_applies(recipe: Recipe, model, adapted: list) -> bool:
    """speed.fused_mlp would run this model's MLPs (4-bit, fused LoRA, nothing in fused_mlp_blocker, gated
    modules whose down_proj is adapted)."""
    speed = recipe.speed
    if not (speed.fused_lora and speed.fused_mlp and recipe.quantization.load_in_4bit):
        return False
    if fused_mlp_blocker(model.config, recipe.lora.dropout):
        return False
    return any(mlp_gate_activation(m) and any(m.down_proj is a for a in adapted) for m in model.modules())


def long_context_settings(speed: SpeedSection) -> bool:
    """Offloaded checkpoints or chunked MLPs: memory is the limit, and the estimate runs low at such row lengths."""
    return bool(speed.offload_checkpoints or speed.mlp_chunk_tokens)
