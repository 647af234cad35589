"""Every place qlora-kit bends transformers / trl / peft / bitsandbytes / accelerate: the tables, and this file.

Verified against transformers 5.17 and 5.24 (tf), trl 1.16.0, peft 0.21.2, bitsandbytes 0.50.2 (bnb), accelerate
1.15 (acc), torch 2.11 to 2.13. tests/test_upstream.py asserts that every upstream name below still exists and that
a guard fails loudly where one is gone; the tests in the second table compare each bend with upstream's own result.
Each bend's comment says what upstream offers, why not, and which internal it touches. Internals read, not
replaced: torch._C._current_graph_task_id (fused MLP), peft's LoRA layer attributes (PEFT_LAYER_ATTRIBUTES),
bitsandbytes' Linear4bit.compute_dtype and weight.quant_state (lora_autograd.py, nf4_triton.py, fp8.py), and torch's
private torch._scaled_mm with rowwise scales (fp8.py; torch 2.11 on an H200, 2.13's signature in test_upstream).
CUDA graph captures (cuda_graphs.py) swap a layer's trainable parameters in its modules' `_parameters` for aliases
of the same memory, and put them back, around the layer's own forward.

| what is replaced      | upstream name                                           | verified  | fallback: upstream |
| --------------------- | ------------------------------------------------------- | --------- | ------------------ |
| LoRA layer forward    | peft.tuners.lora.bnb.Linear4bit.forward                 | peft, bnb | not fusable; FSDP  |
| MLP forward, fused    | the MLP's forward (after Liger's SwiGLU / GEGLU)        | tf, liger | no grad; unfused   |
| MLP forward, chunked  | the MLP's forward                                       | tf        | short rows; MoE    |
| decoder layer forward | GradientCheckpointingLayer.forward                      | tf, torch | eval, no grad      |
| checkpoint function   | GradientCheckpointingLayer._gradient_checkpointing_func | tf        | several processes  |
| kept layers           | GradientCheckpointingLayer.gradient_checkpointing       | tf        | all checkpointed   |
| FLOP count            | transformers.Trainer.floating_point_ops                 | tf        | same formula       |
| gradient clipping     | Trainer._clip_grad_norm, Accelerator.clip_grad_norm_    | tf, acc   | FSDP, DeepSpeed    |
| gradient zeroing      | torch.nn.Module.zero_grad                               | torch     | FSDP               |
| train / eval switch   | torch.nn.Module.train, PreTrainedModel.train            | tf, torch | FSDP; own train()  |
| adapter weight dtype  | trl SFTTrainer casting LoRA weights to bf16             | trl       | FSDP               |
| GPUs without launcher | TrainingArguments._n_gpu                                | tf        | none               |
| CPU 4-bit layout      | bnb.nn.Linear4bit.support_avx512bf16_for_cpu            | bnb       | none               |
| FSDP adapter keys     | peft tuner._remove_adapter_name_from_key                | peft      | no FSDP            |
| modeling module names | Liger's process-wide swaps (apply_rotary_pos_emb, ...)  | tf, liger | restored after     |
| tokens seen (pairs)   | Trainer._track_num_input_tokens                         | tf, trl   | input_ids batches  |
| pair log-probs        | trl.experimental ORPO, CPO: concatenated_forward        | trl       | encoder-decoder    |
| pair decoder forward  | the decoder's forward (model.get_decoder())             | tf, trl   | not pairs; outside |
| pair attention, GPU   | AttentionInterface, AttentionMaskInterface (registered) | tf, torch | no BlockMask: sdpa |
| GRPO sampling weights | GRPOTrainer._generate_single_turn; LoRA layer forward   | trl, peft | nf4; per layer     |
| SFT padding mask      | the model's forward kwargs (trl's right-padded batches) | trl, tf   | eval, generation   |
| graphed decoder layer | GradientCheckpointingLayer.forward, its checkpoint flag | tf, torch | new shape: eager   |

| bend (rows as above)                       | test comparing it with upstream                                     |
| ------------------------------------------ | ------------------------------------------------------------------- |
| use_fused_lora                             | test_speed: test_fused_lora_matches_peft_in_loss_and_every_gradient |
| use_fused_mlp                              | test_speed: test_fused_mlp_matches_peft_in_loss_and_every_gradient  |
| chunk_mlps                                 | test_speed: test_chunked_mlp_trains_the_same_as_the_whole_mlp       |
| compile_decoder_layers                     | test_speed: test_compiled_layers_train_the_same_with_one_graph_...  |
| use_checkpoint_function                    | test_speed: test_offloaded_checkpoints_train_the_same_...           |
| keep_activations                           | test_speed: test_layers_that_keep_their_activations_train_the_same  |
| count_parameters_for_flops_once            | test_speed: test_the_flop_count_takes_the_parameter_count_once_...  |
| clip_only_trainable_gradients              | test_speed: test_gradient_clipping_and_zeroing_list_the_...         |
| zero_only_trainable_gradients              | the same test                                                       |
| switch_modes_only_when_a_module_differs    | test_speed: test_trainer_mode_switches_walk_the_model_...           |
| keep_adapter_weights_in_fp32               | test_pipeline: test_adapter_weights_are_saved_as_fp32_...           |
| train_on_one_gpu_without_a_launcher        | test_upstream: test_several_gpus_without_a_launcher_...             |
| model.keep_4bit_weights_in_training_layout | test_pipeline: test_an_eval_forward_on_cpu_leaves_...               |
| trainers.write_peft_adapter                | test_reliability: test_fsdp_adapter_writer_matches_peft_...         |
| modeling_module_restored                   | test_upstream: test_names_swapped_in_the_modeling_module_are_...    |
| trainers.CountsPairTokens                  | test_methods: test_tokens_seen_are_every_token_of_the_trained_...   |
| trainers.ChunkedPairLogProbs               | test_pair_log_probs: test_orpo_and_simpo_give_trl_s_loss_...        |
| shared_prefix.share_pair_prefixes          | test_shared_prefix: test_shared_prefix_gives_the_unshared_loss_...  |
| shared_prefix.use_flex_attention_for_pairs | test_shared_prefix: test_flex_attention_gives_the_... (GPU only)    |
| generation.merged_lora_weights             | test_grpo: test_sampling_on_merged_weights_gives_peft_s_greedy_...  |
| skip_padding_mask                          | test_speed: test_sft_without_the_padding_mask_gives_the_same_loss...|
| cuda_graphs.use_cuda_graphs                | test_gpu: test_cuda_graph_layers_train_to_eager_gradients (GPU)     |

model.* lives where the model is loaded (model.py), trainers.* where the trainers are built and the adapter saved
(trainers.py), shared_prefix.* in shared_prefix.py (the pair forward, its masks and its attention function),
generation.* in generation.py (GRPO's sampling weights, entered by trainers' GRPO trainer), cuda_graphs.* in
cuda_graphs.py (the graphs' capture and replay); the rest are here.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from collections.abc import Callable, Iterator

import torch

from qlora_kit.recipe import QloraKitError
from qlora_kit.speed.fp8 import fp8_applies
from qlora_kit.speed.lora_autograd import GatedDownOver4bit, LoraOver4bit
from qlora_kit.speed.nf4_triton import nf4_dequantize_applies

log = logging.getLogger("qlora_kit")

VERIFIED = "transformers 5.17-5.24, trl 1.16.0, peft 0.21.2, bitsandbytes 0.50.2, accelerate 1.15"


def upstream_changed(what: str) -> QloraKitError:
    """The error for an upstream internal that is not where a bend expects it: a version qlora-kit was not checked
    against. Failing is safer than training through the wrong path."""
    return QloraKitError(f"{what}: this installation differs from the versions qlora-kit was checked against "
                         f"({VERIFIED}); install those, or turn the speed switch off")


def rebind_forward(module: torch.nn.Module, forward: Callable, saved_as: str, **attributes) -> bool:
    """Bind `forward` as `module`'s forward, keeping the current one (whatever patched it last) as `saved_as` and
    setting `attributes` on the module; returns False, changing nothing, when the module was rebound before."""
    if hasattr(module, saved_as):
        return False
    setattr(module, saved_as, module.forward)
    for name, value in attributes.items():
        setattr(module, name, value)
    module.forward = types.MethodType(forward, module)
    return True


# ---------------------------------------------------------------------------------------- peft LoRA layers

# peft offers: Linear4bit.forward, which clones the base output and adds the adapter in separate autograd nodes.
# Why not: it saves and replays every intermediate; LoraOver4bit computes the same in one function (lora_autograd.py).
# Internal touched: each Linear4bit's forward, and its lora_A / lora_B / lora_dropout / scaling / lora_variant.
PEFT_LAYER_ATTRIBUTES = ("lora_A", "lora_B", "lora_dropout", "scaling", "lora_variant", "active_adapters", "merged",
                         "disable_adapters")


def fusable_adapter(layer) -> str | None:
    """The one plain-LoRA adapter this peft layer would run now, or None when peft's own forward must run.

    Fused: one active adapter, not merged, not disabled, no LoRA variant (DoRA, aLoRA: peft's `lora_variant`), frozen
    base bias. Anything else (several adapters, mixed-batch inference, adapters switched off for a reference pass)
    takes peft's path unchanged.
    """
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant:
        return None
    base = layer.get_base_layer()
    if base.bias is not None and base.bias.requires_grad:
        return None
    return name


def fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # in eval mode (generation, evaluation) bitsandbytes' own inference kernels are the fast path
    name = fusable_adapter(self) if self.training and not args and not kwargs else None
    if name is None or torch.compiler.is_compiling():  # compiled layers run peft's ops (see compiled_training_forward)
        return self._peft_forward(x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    x_lora = None if isinstance(dropout, torch.nn.Identity) else dropout(x)
    return LoraOver4bit.apply(x, x_lora, self.lora_A[name].weight, self.lora_B[name].weight, self.get_base_layer(),
                              self.scaling[name], self._cast_adapters_once)


def use_fused_lora(model, cast_adapters_once: bool = True, triton_dequantize: bool = True,
                   fp8_matmul: bool = False) -> int:
    """Route every peft LoRA layer over a bitsandbytes 4-bit linear through LoraOver4bit; returns how many.
    `cast_adapters_once`: keep each adapter weight's compute-dtype copy until it changes (see in_compute_dtype);
    `triton_dequantize`: dequantize NF4 weights with qlora-kit's Triton kernel where it applies (dequantized_weight;
    the model must sit on its GPU already); `fp8_matmul`: their big matmuls in float8 where fp8.fp8_applies."""
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    count = 0
    for module in model.modules():
        if not isinstance(module, PeftLinear4bit):
            continue
        missing = [name for name in PEFT_LAYER_ATTRIBUTES if not hasattr(module, name)]
        if missing:  # e.g. no lora_variant: a DoRA layer would silently take the plain-LoRA path
            raise upstream_changed(f"speed.fused_lora: peft's Linear4bit has no {', '.join(missing)}")
        base = module.get_base_layer()  # whether the kernel covers this weight is decided once, not per call
        triton = triton_dequantize and nf4_dequantize_applies(base.weight.data, base.weight.quant_state)
        if rebind_forward(module, fused_lora_forward, "_peft_forward", _cast_adapters_once=cast_adapters_once):
            base._triton_dequantize = triton
            base._fp8_matmul = fp8_matmul and fp8_applies(base)
            count += 1
    return count


# ---------------------------------------------------------------------------------------- decoder MLPs

# transformers offers: each architecture's MLP forward, down_proj(act(gate_proj(x)) * up_proj(x)).
# Why not: autograd keeps silu(gate) * up per layer, and a checkpointed layer's recompute computes an output nothing
# reads. Internal touched: the MLP module's forward (Liger's SwiGLU patch included) and its three projections.

# Decoder layers that end `residual + mlp(norm(hidden))`: nothing saves the MLP's output for backward, so a recompute
# can skip computing it. (Not, say, OLMo 2 or Gemma 2, which normalise the MLP output first.) Phi-3 puts a dropout
# between, which saves its mask, not its input (none at all at p = 0).
MLP_OUTPUT_ONLY_SUMMED = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                          "Phi3DecoderLayer")


def fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    down = self.down_proj
    training = self.training and torch.is_grad_enabled() and hasattr(down, "_peft_forward")
    name = fusable_adapter(down) if training else None
    if name is None or not isinstance(down.lora_dropout[name], torch.nn.Identity) or torch.compiler.is_compiling():
        return self._unfused_mlp_forward(x)
    # Run inside backward, this forward is a checkpointed layer's recompute: autograd needs what the MLP saves, never
    # its output, when the layer only adds that output to the residual (a 481 GFLOP matmul per 8B layer and step).
    unread = self._output_only_summed and torch._C._current_graph_task_id() != -1
    if hasattr(self, "gate_up_proj"):  # Phi-3's one projection for both, gate first (Phi3MLP.forward)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    else:
        gate, up = self.gate_proj(x), self.up_proj(x)
    return GatedDownOver4bit.apply(gate, up, down.lora_A[name].weight, down.lora_B[name].weight,
                                   down.get_base_layer(), down.scaling[name], down._cast_adapters_once, not unread,
                                   self._gate_activation)


def use_fused_mlp(model) -> int:
    """Run every gated MLP the fused MLP computes (SiLU or tanh-GELU gate; Phi-3's fused gate_up_proj too) whose down
    projection takes the fused LoRA path through GatedDownOver4bit; returns how many. Other MLPs (and any call the
    fused path cannot take) keep their own forward."""
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    from qlora_kit.model import mlp_gate_activation

    summed = {id(layer.mlp) for layer in model.modules()
              if type(layer).__name__ in MLP_OUTPUT_ONLY_SUMMED and hasattr(layer, "mlp")}
    return sum(rebind_forward(module, fused_mlp_forward, "_unfused_mlp_forward",
                              _output_only_summed=id(module) in summed, _gate_activation=mlp_gate_activation(module))
               for module in model.modules()
               if mlp_gate_activation(module) and isinstance(module.down_proj, PeftLinear4bit))


def chunked_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    tokens = x.shape[:-1].numel()
    if tokens <= self._chunk_tokens:
        return self._unchunked_forward(x)
    flat = x.reshape(tokens, x.shape[-1])
    if torch.is_grad_enabled():
        parts = [torch.utils.checkpoint.checkpoint(self._unchunked_forward, chunk, use_reentrant=False)
                 for chunk in flat.split(self._chunk_tokens)]
    else:
        parts = [self._unchunked_forward(chunk) for chunk in flat.split(self._chunk_tokens)]
    return torch.cat(parts).view(*x.shape[:-1], -1)


def chunk_mlps(model, chunk_tokens: int) -> int:
    """Run each decoder layer's dense MLP over chunks of `chunk_tokens` tokens (the MLP is per token, so the result is
    the same); returns how many MLPs were wrapped. Mixture-of-experts blocks (router outputs, load-balancing losses)
    are left whole."""
    return sum(rebind_forward(module, chunked_mlp_forward, "_unchunked_forward", _chunk_tokens=chunk_tokens)
               for name, module in model.named_modules()
               if name.endswith(".mlp") and (hasattr(module, "down_proj") or hasattr(module, "fc2"))
               and not hasattr(module, "experts"))


# ---------------------------------------------------------------------------------------- decoder layers

# transformers offers: gradient_checkpointing_enable, torch's non-reentrant checkpoint on every decoder layer.
# Why not: reentrant / offloaded checkpoints and layers that keep their activations are faster or leaner per run.
# Internal touched: each GradientCheckpointingLayer's _gradient_checkpointing_func and gradient_checkpointing flag.


def checkpointed_decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers that checkpoint now (the trainer switched checkpointing on)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def use_checkpoint_function(model, function) -> int:
    """Make every checkpointed module checkpoint with `function`; returns how many decoder layers that is."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):  # transformers' flag, on any module that checkpoints
            if not hasattr(module, "_gradient_checkpointing_func"):
                raise upstream_changed(f"speed checkpointing: {type(module).__name__} checkpoints without "
                                       "transformers' _gradient_checkpointing_func")
            module._gradient_checkpointing_func = function
            count += isinstance(module, GradientCheckpointingLayer)
    return count


def keep_activations(model, layers: int) -> int:
    """Switch checkpointing off for the last `layers` decoder layers: they keep their activations and skip the
    recompute in backward. Returns how many layers still checkpoint."""
    checkpointed = checkpointed_decoder_layers(model)
    for module in checkpointed[len(checkpointed) - min(layers, len(checkpointed)):]:
        module.gradient_checkpointing = False
    return max(len(checkpointed) - layers, 0)


# torch offers: torch.compile(model), which would also compile evaluation and generation (KV caches, one-token
# steps). Why not: each decoder layer's training forward alone compiles to one graph shared by its kind.
# Internal touched: each GradientCheckpointingLayer's forward.
# Inside a compiled layer the LoRA linears run peft's own ops (bitsandbytes' 4-bit matmul, lora_A, lora_B), which
# inductor fuses, and the fused MLP steps aside: traced by inductor, the fused LoRA functions gave wrong LoRA gradients
# or NaN at some shapes on CUDA (torch 2.11, H200: Gemma 2/3 at 3 x 128 tokens, 512 wide; right at 4 x 128 and
# 2 x 2048), where peft's ops compiled matched eager at every shape (scripts/compiled_layer_check.py).


def compiled_training_forward(self, *args, **kwargs):
    if self.training and torch.is_grad_enabled():
        return self._compiled_forward(*args, **kwargs)
    return self._eager_forward(*args, **kwargs)


def compile_decoder_layers(model) -> int:
    """speed.compile_layers: run every decoder layer's forward through torch.compile while it trains; returns how
    many. Evaluation and generation keep the eager forward, so they never wait on a compile. Decoder layers of one
    kind share a compiled graph (dynamo reuses it across instances); layers that checkpoint and layers that keep
    their activations get one each."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(rebind_forward(layer, compiled_training_forward, "_eager_forward",
                              _compiled_forward=torch.compile(layer.forward))
               for layer in model.modules() if isinstance(layer, GradientCheckpointingLayer))


# ---------------------------------------------------------------------------------------- the Trainer


def bend_trainer(trainer, under_fsdp: bool, before_trl: dict[str, torch.Tensor] | None = None) -> None:
    """The per-step host work Trainer does that the trainable parameters listed once make unnecessary, and the
    adapter's fp32 master weights (`before_trl`: the weights as they were before the trainer's cast); under FSDP
    (flat parameters, modules wrapped when training starts) only those that stay correct there."""
    count_parameters_for_flops_once(trainer)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    clip_only_trainable_gradients(trainer, trainable)
    if not under_fsdp:
        keep_adapter_weights_in_fp32(trainer.model, before_trl)  # FSDP needs one dtype per shard
        zero_only_trainable_gradients(trainer.model, trainable)  # FSDP's flat parameters replace the model's own
        switch_modes_only_when_a_module_differs(trainer.model)  # FSDP wraps modules when training starts


def count_parameters_for_flops_once(trainer) -> None:
    """transformers offers: Trainer.floating_point_ops, which walks every parameter in every step (~6 ms of host time
    at 8B layout, which a GPU may wait for). Why not: the count cannot change while training. Internal touched: the
    instance's floating_point_ops, with transformers' own formula and its own `main_input_name` / `num_parameters`
    lookups."""
    model = trainer.model
    main_input = getattr(model, "main_input_name", "input_ids")  # as Trainer.floating_point_ops looks it up
    if not hasattr(model, "num_parameters"):  # Trainer counts 0 FLOPs then: nothing to take once
        return
    parameters = model.num_parameters(exclude_embeddings=True)

    def floating_point_ops(inputs) -> int:
        return 6 * inputs[main_input].numel() * parameters if main_input in inputs else 0

    trainer.floating_point_ops = floating_point_ops


def clip_only_trainable_gradients(trainer, trainable: list[torch.nn.Parameter]) -> None:
    """transformers offers: Trainer._clip_grad_norm, through accelerate with every parameter listed anew in every
    step (~4 ms of host time at 8B layout, while the GPU waits). Why not: only the adapter's have gradients; the same
    norm and clipping over the trainable parameters listed once. Internal touched: the instance's _clip_grad_norm;
    one process or DDP only (FSDP and DeepSpeed clip their own way and keep Trainer's)."""
    from accelerate.utils import DistributedType

    if trainer.accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU):
        return
    trainer._clip_grad_norm = lambda model: trainer.accelerator.clip_grad_norm_(trainable, trainer.args.max_grad_norm)


def zero_only_trainable_gradients(model, trainable: list[torch.nn.Parameter]) -> None:
    """torch offers: Module.zero_grad, which Trainer calls after every optimizer step and which walks every module
    and parameter (~3.5 ms at 8B layout). Why not: only the trainable parameters have gradients. Internal touched:
    the model instance's zero_grad (under DDP Trainer calls the wrapper's, which stays torch's)."""

    def zero_grad(set_to_none: bool = True) -> None:
        for param in trainable:
            if param.grad is not None:
                if set_to_none:
                    param.grad = None
                else:
                    param.grad.zero_()

    model.zero_grad = zero_grad


def switch_modes_only_when_a_module_differs(model) -> None:
    """torch offers: Module.train, which Trainer calls before every micro-batch and which sets every module's flag in
    a recursive walk (~6.5 ms at 8B layout). Why not: checking that every flag already matches takes ~0.8 ms; the
    walk runs only when one differs (after evaluation, or a module switched on its own). Internal touched: the model
    instance's train. The check walks the live module tree, so modules added later count. A model holding a module
    whose own `train()` does more than set the flag (peft's DoRA clears a cache) keeps torch's walk."""
    from transformers import PreTrainedModel

    plain = (torch.nn.Module.train, PreTrainedModel.train)  # transformers' acts only when the mode changes
    if any(type(module).train not in plain for module in model.modules()):
        return

    def train(self, mode: bool = True):
        return self if every_module_in_mode(self, mode) else type(self).train(self, mode)

    model.train = types.MethodType(train, model)  # bound, so that a deep copy switches itself, not this model


def every_module_in_mode(root: torch.nn.Module, mode: bool) -> bool:
    """Whether `root` and every module under it have `training == mode` (stops at the first that differs)."""
    modules = [root]
    for module in modules:  # the list grows as it is read: breadth first, no recursion
        if module.training != mode:
            return False
        modules += [child for child in module._modules.values() if child is not None]
    return True


def keep_adapter_weights_in_fp32(model, before_trl: dict[str, torch.Tensor] | None = None) -> None:
    """trl offers: SFTTrainer casting a quantized model's LoRA weights to bf16. Why not: small optimizer updates
    vanish, fp16-only GPUs get bf16, CPU runs compute the adapters in slow bf16, and a resumed run (peft reloads fp32)
    trains in another dtype. Internal touched: the trainable parameters' data, back to fp32 master weights (bf16/fp16
    compute comes from autocast). The weights as they were before trl's cast (`before_trl`, by parameter name) come
    back exactly: a continued `model.adapter` must start where it ended, equal to its frozen reference copy."""
    before_trl = before_trl or {}
    for name, param in model.named_parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = before_trl[name] if name in before_trl else param.data.float()


def train_on_one_gpu_without_a_launcher(args) -> None:
    """transformers offers: nn.DataParallel over every visible GPU when `qlora-kit train` (no launcher) sees several,
    which trl refuses, with the model on cuda:0. Why not: train on cuda:0 and say how to use them all. Internal
    touched: TrainingArguments._n_gpu (the value behind `args.n_gpu`)."""
    if args.n_gpu > 1:
        log.warning("%d GPUs visible but no launcher: training on cuda:0 only. To use all of them: accelerate launch "
                    "--config_file recipes/accelerate/ddp.yaml --num_processes %d train.py RECIPE", args.n_gpu,
                    args.n_gpu)
        args._n_gpu = 1


@contextlib.contextmanager
def modeling_module_restored(model: torch.nn.Module) -> Iterator[None]:
    """Liger (trl/transformers' `use_liger_kernel`) swaps functions and classes of the model's modeling module, e.g.
    `modeling_llama.apply_rotary_pos_emb`, for the whole process; we want them only while this model trains: a model
    built later in the process (the merge check's CPU forward) would run Triton kernels on CPU tensors. Every global
    name of that module is put back as it was when training ends (liger-kernel 0.8.5, transformers 5.17 / 5.24)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = sys.modules[type(base).__module__]
    before = dict(vars(module))
    try:
        yield
    finally:
        for name, value in before.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)


def skip_padding_mask(trainer) -> torch.utils.hooks.RemovableHandle:
    """speed.skip_padding_mask: the SFT model's training forward gets no attention mask. trl's
    DataCollatorForLanguageModeling pads input_ids and labels on the right, labels with -100 (trl 1.16), so the mask
    only hides padding from padding: with the causal mask alone every labelled token attends to what it did, and the
    loss and gradients are the same. What upstream offers: transformers' sdpa_mask drops a mask only when nothing is
    padded, after a device-to-host check, and otherwise attention runs with a dense mask (no causal kernel, key/value
    heads copied for grouped-query attention). Touches: the model's forward keyword `attention_mask`, in training
    with gradients only (evaluation and generation, which pads on the left, keep it)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = trainer.data_collator
    if not isinstance(collator, DataCollatorForLanguageModeling) or collator.padding_free:
        raise upstream_changed("speed.skip_padding_mask: the SFT batches do not come from trl's right-padding "
                               "DataCollatorForLanguageModeling")
    return trainer.model.register_forward_pre_hook(without_padding_mask, with_kwargs=True)


def without_padding_mask(module: torch.nn.Module, args: tuple, kwargs: dict):
    if module.training and torch.is_grad_enabled() and kwargs.get("attention_mask") is not None:
        return args, {**kwargs, "attention_mask": None}
    return None
