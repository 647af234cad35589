"""Training speed-ups and memory savers, each behind a `speed.*` recipe switch and measured by scripts/bench.py.

Applied to the model the trainer holds when training starts (`Speedups`), after trl/transformers have set it up
(Liger's kernels patch module forwards, in `train()` on transformers 5.17; the switches here wrap whatever forward is
current then):

- fused LoRA over 4-bit layers: one autograd function per adapted layer computes the frozen NF4 matmul and the
  adapter together, with a hand-written backward. peft's path clones every base output, scales and adds the adapter
  output in separate kernels, and lets autograd save and replay all of it; here the adapter lands in the base output
  through one addmm, and backward needs one big matmul (grad input through the re-dequantized weight) plus rank-r
  ones. Nothing larger than the layer input is saved.
- reentrant checkpointing: a checkpointed layer's first forward builds no autograd graph.
- layers that keep their activations: memory headroom spent on skipping their recompute.
- offloaded checkpoints: each checkpointed layer's input lives in CPU memory until backward needs it.
- chunked MLP: the MLP runs over chunks of tokens, each recomputed in backward, so its 3.5x-wide intermediates exist
  for one chunk at a time (long context).
- fused MLP: silu(gate) * up and the down projection as one function that recomputes the product in backward, so a
  layer that keeps its activations holds one 3.5x-wide tensor less; in a checkpointed layer's recompute it skips the
  down projection's matmul, whose output nothing reads there.
- the fp32 adapter weights' compute-dtype copies, made once per optimizer step instead of in every call.
- NF4 dequantize through a Triton kernel (kernels.py): bitsandbytes' bits, one kernel instead of three, faster.
- a step-scheduled Python garbage collector (off: no measured difference).
- compiled layers (off: measured no faster on fast hosts): torch.compile of each decoder layer's training forward.
"""

from __future__ import annotations

import functools
import gc
import logging
import types

import torch
from transformers import TrainerCallback

from qlora_kit.kernels import nf4_dequantize, nf4_dequantize_applies, nf4_dequantize_kernel
from qlora_kit.model import under_fsdp
from qlora_kit.recipe import Recipe, SpeedSection

log = logging.getLogger("qlora_kit")


class LoraOver4bit(torch.autograd.Function):
    """y = x W^T (+ bias) + s * (x' A^T) B^T with W frozen in NF4/FP4, x' = dropout(x) (None: x itself);
    gradients for x, x', A and B.

    Matmuls run in the layer's compute dtype (as under autocast); A and B may be fp32 master weights. Saved for
    backward: the adapter's input and its rank-r projection x' A^T; the 4-bit weight is dequantized again there.
    """

    @staticmethod
    def forward(ctx, x, x_lora, lora_a, lora_b, layer, scaling, cast_once=True):
        dtype = layer.compute_dtype or x.dtype
        xc = x.to(dtype)
        xl2 = (xc if x_lora is None else x_lora.to(dtype)).reshape(-1, x.shape[-1])
        bias = None if layer.bias is None else layer.bias.to(dtype)
        a, b = in_compute_dtype(lora_a, dtype, cast_once), in_compute_dtype(lora_b, dtype, cast_once)
        out, xa = frozen_matmul_plus_adapter(xc, xl2, a, b, layer, scaling, x.dtype, bias)
        ctx.layer, ctx.scaling, ctx.same_input = layer, scaling, x_lora is None
        ctx.dtypes = (x.dtype, (x if x_lora is None else x_lora).dtype, lora_a.dtype, lora_b.dtype)
        ctx.save_for_backward(xl2, xa, a, b)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xl2, xa, a, b = ctx.saved_tensors
        layer, s = ctx.layer, ctx.scaling
        x_dtype, xl_dtype, a_dtype, b_dtype = ctx.dtypes
        dtype = xa.dtype
        batch_shape = grad_out.shape[:-1]
        g = grad_out.to(dtype).reshape(-1, grad_out.shape[-1])
        need_x, need_xl, need_a, need_b = ctx.needs_input_grad[:4]
        grad_xa = adapter_output_grad(g, b, s)
        grad_x = grad_xl = grad_a = grad_b = None
        if need_x:
            grad_x = torch.mm(g, dequantized_weight(layer, dtype))
            if ctx.same_input:
                grad_x.addmm_(grad_xa, a)
            grad_x = grad_x.view(*batch_shape, -1).to(x_dtype)
        if not ctx.same_input and need_xl:
            grad_xl = torch.mm(grad_xa, a).view(*batch_shape, -1).to(xl_dtype)
        if need_a:
            grad_a = matmul_into(grad_xa.t(), xl2, a_dtype)
        if need_b:
            grad_b = adapter_b_grad(g, xa, s, b_dtype)
        return grad_x, grad_xl, grad_a, grad_b, None, None, None


def frozen_matmul_plus_adapter(x, x_lora2d, a, b, layer, scaling, out_dtype, bias=None):
    """x W^T (+ bias) + s (x' A^T) B^T in the compute dtype of x (that of `a` and `b` too), returned in `out_dtype`,
    and x' A^T (rank r, what backward keeps). `x_lora2d` is the adapter's input x' flattened to 2-D."""
    compiling = torch.compiler.is_compiling()
    if compiling:  # an opaque op: inductor must not merge it with backward's dequantize
        import bitsandbytes as bnb

        out = bnb.matmul_4bit(x, layer.weight.t(), bias=bias, quant_state=layer.weight.quant_state)
    else:  # what bitsandbytes does for a batch this size (dequantize, then one matmul), with our dequantize
        out = torch.nn.functional.linear(x, dequantized_weight(layer, x.dtype), bias)
    xa = torch.mm(x_lora2d, a.t())
    if compiling:
        # Under torch.compile the returned tensor must be no other value of this forward (no in-place sum, no
        # same-dtype .to()): torch 2.11 routes its gradient to the wrong output otherwise, and every LoRA
        # gradient upstream of it comes out zero (pytorch/pytorch#180642).
        y = torch.addmm(out.view(-1, out.shape[-1]), xa, b.t(), alpha=scaling).view(out.shape)
        return (y if y.dtype == out_dtype else y.to(out_dtype)), xa
    # The adapter lands on the base output in place. Writing it first and letting the big matmul accumulate onto it
    # (beta=1) gained for gate/up in one H100 run of three and lost for k/v (scripts/adapter_add_bench.py).
    out.view(-1, out.shape[-1]).addmm_(xa, b.t(), alpha=scaling)
    return out.to(out_dtype), xa


def adapter_output_grad(g: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """d loss / d (x' A^T) from the output gradient `g` (2-D) and B, both in the compute dtype: rank r, small."""
    return torch.mm(g, b).mul_(scaling)


_copies_generation = [0]  # bumped by forget_compute_copies


def in_compute_dtype(weight: torch.Tensor, dtype: torch.dtype, cast_once: bool = True) -> torch.Tensor:
    """An fp32 master adapter weight cast to the compute dtype once per change, not in every call.

    Forward, checkpointed recompute and backward each need the bf16 copy: cast per call, that is about 1,600 small
    cast kernels per 8B step. A copy is reused while the weight's version counter (bumped by in-place updates through
    torch: optimizers, checkpoint loads) and storage stay the same, and until the trainer's next optimizer step
    (`Speedups` forgets them all then: an optimizer writing through its own kernels may not bump the counter). It
    costs 2 bytes per adapter parameter, so the long-context settings (memory first) cast in every call instead
    (`cast_once` false).
    """
    if weight.dtype == dtype or not cast_once or torch.compiler.is_compiling():
        return weight.to(dtype)
    key = (weight._version, weight.data_ptr(), dtype, _copies_generation[0])
    cached = getattr(weight, "_qlora_kit_compute_copy", None)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(dtype))
        weight._qlora_kit_compute_copy = cached
    return cached[1]


def forget_compute_copies() -> None:
    """Every cached compute-dtype copy is stale from now on (each is replaced at its weight's next use)."""
    _copies_generation[0] += 1


def adapter_b_grad(g: torch.Tensor, xa: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """d loss / d B in `dtype` (B's own) from the output gradient `g` (2-D) and the saved x' A^T."""
    return matmul_into(g.t(), xa, dtype).mul_(scaling)


MM_OUT_DTYPE = torch.__version__ >= "2.8"  # torch.mm(..., out_dtype=torch.float32) from bf16/fp16, CUDA


def matmul_into(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b in `dtype`. An fp32 adapter weight's gradient from bf16/fp16 inputs comes out of the GEMM in fp32 on
    CUDA (torch >= 2.8): one kernel instead of a matmul and a cast, and the result is not rounded to bf16 first."""
    if (MM_OUT_DTYPE and dtype == torch.float32 and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16)
            and not torch.compiler.is_compiling()):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).to(dtype)


class SwigluDownOver4bit(torch.autograd.Function):
    """down_proj(silu(gate) * up) for a LoRA down projection over a 4-bit weight, without saving silu(gate) * up.

    That product is as wide as gate and up, and the plain path keeps all three per layer (the activation saves gate
    and up, the down projection its input). Here backward recomputes it from gate and up, which the activation's
    backward reads anyway: one intermediate-sized tensor less per layer that keeps its activations. Gradients for
    gate, up, A and B.

    `output_read` false: the caller knows nothing will read the output (a checkpointed layer's recompute, see
    fused_mlp_forward), so the down projection's matmul is skipped; backward is the same.
    """

    @staticmethod
    def forward(ctx, gate, up, lora_a, lora_b, layer, scaling, cast_once=True, output_read=True):
        dtype = layer.compute_dtype or gate.dtype
        h = silu_mul(gate, up).to(dtype)
        a, b = in_compute_dtype(lora_a, dtype, cast_once), in_compute_dtype(lora_b, dtype, cast_once)
        if output_read:
            out, xa = frozen_matmul_plus_adapter(h, h.reshape(-1, h.shape[-1]), a, b, layer, scaling, gate.dtype)
        else:  # only what backward needs; NaN, so that a reader the caller did not foresee fails loudly
            xa = torch.mm(h.reshape(-1, h.shape[-1]), a.t())
            out = torch.full((*gate.shape[:-1], layer.out_features), float("nan"), dtype=gate.dtype,
                             device=gate.device)
        ctx.layer, ctx.scaling = layer, scaling
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.save_for_backward(gate, up, xa, a, b)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, xa, a, b = ctx.saved_tensors
        layer, s = ctx.layer, ctx.scaling
        a_dtype, b_dtype = ctx.dtypes
        dtype = xa.dtype
        g = grad_out.to(dtype).reshape(-1, grad_out.shape[-1])
        grad_xa = adapter_output_grad(g, b, s)
        grad_b = adapter_b_grad(g, xa, s, b_dtype)
        h2 = silu_mul(gate, up).to(dtype).reshape(-1, gate.shape[-1])  # recomputed, not saved
        grad_a = matmul_into(grad_xa.t(), h2, a_dtype)
        del h2
        # The rank-r term first, then the big matmul accumulates onto it (beta=1): for this output, as wide as the
        # MLP, that measured 4-7% faster than adding the rank-r term afterwards (scripts/adapter_add_bench.py).
        grad_h = torch.mm(grad_xa, a).addmm_(g, dequantized_weight(layer, dtype))
        grad_gate, grad_up = silu_mul_backward(gate, up, grad_h.view(gate.shape).to(gate.dtype))
        return grad_gate, grad_up, grad_a, grad_b, None, None, None, None


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up as Liger computes it (silu in fp32, cast to up's dtype, times up): its Triton kernel on a GPU
    with liger-kernel, the same arithmetic in torch ops elsewhere."""
    if gate.is_cuda and liger_swiglu() is not None:
        return liger_swiglu().swiglu_forward(gate.contiguous(), up.contiguous())[2]
    return torch.nn.functional.silu(gate.float()).to(up.dtype) * up


def silu_mul_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor):
    """Gradients of silu(gate) * up for gate and up. Liger's kernel writes them over gate and up (saved tensors
    that nothing reads afterwards); the torch-ops version allocates."""
    if gate.is_cuda and liger_swiglu() is not None:
        return liger_swiglu().swiglu_backward(gate.contiguous(), up.contiguous(), grad.contiguous())
    sig = torch.sigmoid(gate.float())
    silu = gate.float() * sig
    grad_up = (grad.float() * silu).to(up.dtype)
    grad_gate = (grad.float() * (silu * (1 - sig) + sig) * up.float()).to(gate.dtype)
    return grad_gate, grad_up


@functools.cache
def liger_swiglu():
    """liger_kernel.ops.swiglu when liger-kernel is installed, else None (imported on first use: Triton is slow to
    import and absent on CPU-only machines)."""
    try:
        from liger_kernel.ops import swiglu
    except ImportError:
        return None
    return swiglu


def dequantized_weight(layer, dtype: torch.dtype) -> torch.Tensor:
    """The frozen 4-bit weight as a dense [out, in] matrix, made for one matmul and dropped after it: through
    qlora-kit's Triton kernel where speed.triton_dequantize is on and it applies (the same bits, in one kernel at
    about 1.6x bitsandbytes' speed), else bitsandbytes'."""
    import bitsandbytes as bnb

    packed, state = layer.weight.data, layer.weight.quant_state
    if getattr(layer, "_triton_dequantize", False) and state.dtype == dtype and not torch.compiler.is_compiling():
        return nf4_dequantize(packed, state)
    return bnb.functional.dequantize_4bit(packed, state).to(dtype)


def fusable_adapter(layer) -> str | None:
    """The one plain-LoRA adapter this peft layer would run now, or None when peft's own forward must run.

    Fused: one active adapter, not merged, not disabled, not DoRA, frozen base bias. Anything else (several adapters,
    mixed-batch inference, adapters switched off for a reference pass) takes peft's path unchanged.
    """
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    base = layer.get_base_layer()
    if base.bias is not None and base.bias.requires_grad:
        return None
    return name


def fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # in eval mode (generation, evaluation) bitsandbytes' own inference kernels are the fast path
    name = fusable_adapter(self) if self.training and not args and not kwargs else None
    if name is None:
        return self._peft_forward(x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    x_lora = None if isinstance(dropout, torch.nn.Identity) else dropout(x)
    return LoraOver4bit.apply(x, x_lora, self.lora_A[name].weight, self.lora_B[name].weight, self.get_base_layer(),
                              self.scaling[name], self._cast_adapters_once)


def fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    down = self.down_proj
    training = self.training and torch.is_grad_enabled() and hasattr(down, "_peft_forward")
    name = fusable_adapter(down) if training else None
    if name is None or not isinstance(down.lora_dropout[name], torch.nn.Identity) or torch.compiler.is_compiling():
        return self._unfused_mlp_forward(x)
    # Run inside backward, this forward is a checkpointed layer's recompute: autograd needs what the MLP saves, never
    # its output, when the layer only adds that output to the residual (a 481 GFLOP matmul per 8B layer and step).
    unread = self._output_only_summed and torch._C._current_graph_task_id() != -1
    return SwigluDownOver4bit.apply(self.gate_proj(x), self.up_proj(x), down.lora_A[name].weight,
                                    down.lora_B[name].weight, down.get_base_layer(), down.scaling[name],
                                    down._cast_adapters_once, not unread)


def gated_silu_mlp(module) -> bool:
    """A Llama-style MLP: down_proj(silu(gate_proj(x)) * up_proj(x)) (Llama, Mistral, Qwen; not Gemma's GELU, not
    fused gate_up projections)."""
    config = getattr(module, "config", None)  # transformers' MLPs keep it; their act_fn class varies by version
    silu = getattr(config, "hidden_act", None) in ("silu", "swish") or isinstance(getattr(module, "act_fn", None),
                                                                                  torch.nn.SiLU)
    return all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) and silu and not hasattr(
        module, "experts")


# Decoder layers that end `residual + mlp(norm(hidden))`: nothing saves the MLP's output for backward, so a recompute
# can skip computing it. (Not, say, OLMo 2 or Gemma 2, which normalise the MLP output first.)
MLP_OUTPUT_ONLY_SUMMED = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


def use_fused_mlp(model) -> int:
    """Run every gated-SiLU MLP whose down projection takes the fused LoRA path through SwigluDownOver4bit; returns
    how many. Other MLPs (and any call the fused path cannot take) keep their own forward."""
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    summed = {id(layer.mlp) for layer in model.modules()
              if type(layer).__name__ in MLP_OUTPUT_ONLY_SUMMED and hasattr(layer, "mlp")}
    count = 0
    for module in model.modules():
        if (gated_silu_mlp(module) and isinstance(module.down_proj, PeftLinear4bit)
                and not hasattr(module, "_unfused_mlp_forward")):
            module._unfused_mlp_forward = module.forward
            module._output_only_summed = id(module) in summed
            module.forward = types.MethodType(fused_mlp_forward, module)
            count += 1
    return count


def use_fused_lora(model, cast_adapters_once: bool = True, triton_dequantize: bool = True) -> int:
    """Route every peft LoRA layer over a bitsandbytes 4-bit linear through LoraOver4bit; returns how many.
    `cast_adapters_once`: keep each adapter weight's compute-dtype copy until it changes (see in_compute_dtype);
    `triton_dequantize`: dequantize NF4 weights with qlora-kit's Triton kernel where it applies (dequantized_weight;
    the model must sit on its GPU already)."""
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    count = 0
    for module in model.modules():
        if isinstance(module, PeftLinear4bit) and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module._cast_adapters_once = cast_adapters_once
            base = module.get_base_layer()  # whether the kernel covers this weight is decided once, not per call
            base._triton_dequantize = triton_dequantize and nf4_dequantize_applies(base.weight.data,
                                                                                  base.weight.quant_state)
            module.forward = types.MethodType(fused_lora_forward, module)
            count += 1
    return count


def reentrant_checkpoint(function, *args, **kwargs):
    """torch's reentrant checkpointing: a layer's first forward runs without building an autograd graph (no graph to
    build and free, no saved-tensor hooks on every op), and backward replays it with one: less CPU work per step."""
    kwargs["use_reentrant"] = True
    kwargs.pop("context_fn", None)
    return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)


PINNED_OFFLOAD_LIMIT = 2**30  # bytes; larger layer inputs go to pageable memory


def pack_to_cpu(tensor: torch.Tensor):
    """A saved GPU tensor moved to CPU memory: pinned (fast copies) up to PINNED_OFFLOAD_LIMIT, pageable beyond.

    torch's pinned-memory cache rounds every block up to a power of two, so the 2.9 GB layer inputs of a 350k-token
    8B row would take 4 GiB each and 32 of them more than a 128 GiB host has; their copies are a small part of a step
    that long anyway.
    """
    if tensor.device.type == "cpu":
        return None, tensor
    pinned = torch.cuda.is_available() and tensor.numel() * tensor.element_size() <= PINNED_OFFLOAD_LIMIT
    packed = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pinned)
    packed.copy_(tensor)
    return tensor.device, packed


def unpack_from_cpu(packed) -> torch.Tensor:
    device, tensor = packed
    return tensor if device is None else tensor.to(device, non_blocking=tensor.is_pinned())


def offloaded_checkpoint(function, *args, **kwargs):
    """Checkpoint a layer with its input kept in CPU memory until backward.

    Reentrant checkpointing stores the layer's inputs with save_for_backward, which saved-tensor hooks can move off
    the GPU; the non-reentrant kind keeps them referenced from the recompute closure, out of reach of such hooks.
    """
    with torch.autograd.graph.saved_tensors_hooks(pack_to_cpu, unpack_from_cpu):
        return reentrant_checkpoint(function, *args, **kwargs)


def use_checkpoint_function(model, function) -> int:
    """Make every checkpointed module checkpoint with `function`; returns how many decoder layers that is."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = function
            count += isinstance(module, GradientCheckpointingLayer)
    return count


def keep_activations(model, layers: int) -> int:
    """Switch checkpointing off for the last `layers` decoder layers: they keep their activations and skip the
    recompute in backward. Returns how many layers still checkpoint."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    checkpointed = [m for m in model.modules()
                    if isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False)]
    for module in checkpointed[len(checkpointed) - min(layers, len(checkpointed)):]:
        module.gradient_checkpointing = False
    return max(len(checkpointed) - layers, 0)


GPU_MEMORY_SPARE = 0.10  # of the usable GPU memory: left free when speed.keep_activations_layers is auto


def layers_to_keep(recipe: Recipe, config) -> int:
    """speed.keep_activations_layers as a number: `auto` becomes how many layers fit on this GPU now.

    The weights are loaded, so the process sees what it can still use (its memory-fraction cap and other
    processes included). From that, minus 10%, minus the estimated peak with every layer checkpointed, each layer
    that keeps its activations takes the estimated one-layer activations. Both estimates are above what was
    measured at seq 2048 (8B, batch 2: 8.3 vs 7.6 GiB, 0.64 vs 0.46 GiB a layer), so auto errs towards fewer.
    None is kept on CPU, and where the estimate runs low (offloaded checkpoints, chunked MLPs: the long-context
    settings).
    """
    from qlora_kit.model import estimate_memory_for_config

    speed = recipe.speed
    if speed.keep_activations_layers != "auto":
        return speed.keep_activations_layers
    if not torch.cuda.is_available() or long_context_settings(speed):
        return 0
    device = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(device)
    fraction_of = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.9
    fraction = fraction_of(device) if fraction_of else 1.0
    usable = min(total * fraction, free + torch.cuda.memory_reserved(device)) / 2**30
    estimate = estimate_memory_for_config(recipe, config)
    layers = config.get_text_config().num_hidden_layers
    keep = kept_layers_that_fit(usable, estimate["total"], estimate["each_kept_layer"], layers)
    log.info("speed.keep_activations_layers: auto -> %d of %d layers keep their activations (%.1f GiB usable on "
             "the GPU, estimated peak %.1f GiB with every layer checkpointed, %.2f GiB per kept layer, %d%% spare)",
             keep, layers, usable, estimate["total"], estimate["each_kept_layer"], 100 * GPU_MEMORY_SPARE)
    return keep


def long_context_settings(speed: SpeedSection) -> bool:
    """Offloaded checkpoints or chunked MLPs: memory is the limit, and the estimate runs low at such row lengths."""
    return bool(speed.offload_checkpoints or speed.mlp_chunk_tokens)


def kept_layers_that_fit(usable_gib: float, checkpointed_peak_gib: float, per_layer_gib: float, layers: int) -> int:
    headroom = usable_gib * (1 - GPU_MEMORY_SPARE) - checkpointed_peak_gib
    return max(0, min(layers, int(headroom // per_layer_gib))) if per_layer_gib > 0 else 0


class CheckpointSettings(TrainerCallback):
    """speed.reentrant_checkpointing / offload_checkpoints / keep_activations_layers: the trainer switches
    checkpointing on (torch's non-reentrant kind, every layer) when training starts; adjust it then."""

    def __init__(self, speed: SpeedSection) -> None:
        self.speed = speed

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.apply(model, report=True)

    def apply(self, model, report: bool = False) -> None:
        """Adjust the checkpointing the model has now (also again after a trainer re-enabled it: GRPO's generation)."""
        say = log.info if report else log.debug
        if self.speed.offload_checkpoints:
            say("speed.offload_checkpoints: %d checkpointed layers keep their inputs in CPU memory",
                use_checkpoint_function(model, offloaded_checkpoint))
        elif self.speed.reentrant_checkpointing:
            say("speed.reentrant_checkpointing: %d layers checkpointed without a graph in their first forward",
                use_checkpoint_function(model, reentrant_checkpoint))
        if self.speed.keep_activations_layers:
            still = keep_activations(model, self.speed.keep_activations_layers)
            say("speed.keep_activations_layers: %d layers keep their activations, %d are recomputed",
                self.speed.keep_activations_layers, still)


def checkpoint_callback(recipe: Recipe, config) -> CheckpointSettings | None:
    """The callback that adjusts checkpointing, if the recipe asks for it, with `auto` kept layers counted for this
    GPU and the model's `config`. One process only: none of these has been measured under DDP or FSDP, which keep
    torch's non-reentrant checkpointing of every layer."""
    import dataclasses

    if not recipe.training.gradient_checkpointing or not adjusts_checkpointing(recipe.speed):
        return None
    if several_processes():
        log.info("speed.reentrant_checkpointing / offload_checkpoints / keep_activations_layers: not applied with "
                 "several processes")
        return None
    speed = dataclasses.replace(recipe.speed, keep_activations_layers=layers_to_keep(recipe, config))
    return CheckpointSettings(speed) if adjusts_checkpointing(speed) else None


def several_processes() -> bool:
    """Launched as one of several processes (DDP, FSDP): the switches measured on one process only stay off."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def adjusts_checkpointing(speed: SpeedSection) -> bool:
    return bool(speed.reentrant_checkpointing or speed.offload_checkpoints or speed.keep_activations_layers)


def layer_compile_blocker(speed: SpeedSection, every_layer_kept: bool = False) -> str | None:
    """Why speed.compile_layers does not apply in this process, or None when it does. `every_layer_kept`: no layer
    recomputes (no gradient checkpointing, or all layers keep their activations)."""

    if not speed.compile_layers:
        return "switched off"
    if speed.compile_layers == "auto" and every_layer_kept:
        return "auto: off, no layer is recomputed (compiled layers measured no faster there)"
    if not torch.cuda.is_available():
        return "off on CPU (no GPU here)"
    if speed.offload_checkpoints or speed.reentrant_checkpointing or speed.mlp_chunk_tokens:
        return "off with offload_checkpoints, reentrant_checkpointing or mlp_chunk_tokens"
    if several_processes():
        return "off with several processes"
    return None


def compile_for_training(layer: torch.nn.Module) -> None:
    """Run `layer`'s forward through torch.compile while it trains; evaluation and generation (no gradients, KV
    caches, one-token steps) keep the eager forward, so they never wait on a compile.

    Decoder layers of one kind share a compiled graph (dynamo reuses it across instances); layers that checkpoint and
    layers that keep their activations get one each.
    """
    eager = layer.forward
    compiled = torch.compile(eager)

    def forward(*args, **kwargs):
        if layer.training and torch.is_grad_enabled():
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    layer.forward = forward


def compile_decoder_layers(model) -> int:
    """speed.compile_layers: compile every decoder layer's training forward; returns how many."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        compile_for_training(layer)
    return len(layers)


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
    count = 0
    for name, module in model.named_modules():
        dense = (hasattr(module, "down_proj") or hasattr(module, "fc2")) and not hasattr(module, "experts")
        if name.endswith(".mlp") and dense and not hasattr(module, "_unchunked_forward"):
            module._unchunked_forward = module.forward
            module._chunk_tokens = chunk_tokens
            module.forward = types.MethodType(chunked_mlp_forward, module)
            count += 1
    return count


def every_layer_keeps_activations(recipe: Recipe, settings: CheckpointSettings | None, config) -> bool:
    """No layer is recomputed: gradient checkpointing is off, or `settings` keep every layer's activations."""
    if not recipe.training.gradient_checkpointing:
        return True
    kept = settings.speed.keep_activations_layers if settings else 0
    return kept >= config.get_text_config().num_hidden_layers


class Speedups(TrainerCallback):
    """Applies the recipe's `speed` switches when training starts: after whatever the trainer does to the model
    first. transformers 5.17 applies Liger's kernels in `train()`, and Liger's SwiGLU would replace a fused or chunked
    MLP forward installed any earlier."""

    def __init__(self, speed: SpeedSection, every_layer_kept: bool) -> None:
        self.speed, self.every_layer_kept = speed, every_layer_kept
        self.gc_scheduled = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        apply_speedups(model, self.speed, self.every_layer_kept)
        if self.speed.gc_every_steps:
            schedule_python_gc()
            self.gc_scheduled = True

    def on_optimizer_step(self, args, state, control, **kwargs):
        forget_compute_copies()  # the adapter weights changed

    def on_step_end(self, args, state, control, **kwargs):
        if self.speed.gc_every_steps and state.global_step % self.speed.gc_every_steps == 0:
            gc.collect(1)

    def on_train_end(self, args, state, control, **kwargs):
        self.restore_python_gc()

    def restore_python_gc(self) -> None:
        """Python's own collection schedule again, if training changed it (also run when training ends with an
        error, which skips on_train_end)."""
        if self.gc_scheduled:
            gc.unfreeze()
            gc.enable()
            self.gc_scheduled = False


def schedule_python_gc() -> None:
    """speed.gc_every_steps: everything alive now (model, libraries) leaves the collector's view, and automatic
    collections stop; `Speedups` collects the young generations every N steps instead."""
    gc.collect()
    gc.freeze()
    gc.disable()


def apply_speedups(model, speed: SpeedSection, every_layer_kept: bool = False) -> None:
    """Apply the recipe's `speed` switches to a model the trainer has set up; says what it did."""
    if speed.fused_lora and under_fsdp():
        log.info("speed.fused_lora: off under FSDP (its flattened shards are not bitsandbytes weights); peft's path")
    elif speed.fused_lora:
        log.info("speed.fused_lora: %d LoRA layers over 4-bit weights fused", use_fused_lora(
            model, cast_adapters_once=not long_context_settings(speed), triton_dequantize=speed.triton_dequantize))
        if speed.triton_dequantize and torch.cuda.is_available():
            log.info("speed.triton_dequantize: %s", "NF4 weights dequantize through qlora-kit's Triton kernel"
                     if nf4_dequantize_kernel() is not None else "Triton is not installed; bitsandbytes' kernels")
        if speed.fused_mlp:
            log.info("speed.fused_mlp: %d gated-SiLU MLPs recompute silu(gate) * up in backward", use_fused_mlp(model))
    blocker = layer_compile_blocker(speed, every_layer_kept)
    if blocker is None:
        log.info("speed.compile_layers: %d decoder layers compile on their first training step",
                 compile_decoder_layers(model))
    elif speed.compile_layers:
        log.info("speed.compile_layers: %s", blocker)
    if speed.mlp_chunk_tokens:
        chunked = chunk_mlps(model, speed.mlp_chunk_tokens)
        log.info("speed.mlp_chunk_tokens: %d MLPs run over chunks of %d tokens", chunked, speed.mlp_chunk_tokens)
