"""GRPO's sampling on merged compute-dtype weights (speed.generation_weights: bf16).

A decode step feeds a few rows through every projection. On peft's path each LoRA layer over a 4-bit weight then
dequantizes its whole weight, runs the base matmul and the adapter's small matmuls, scales and adds: launch- and
dequantize-bound. For the length of one generate call, `merged_lora_weights` gives each such layer one dense weight

    W = dequantize(W4) + s B A        (one dequantize and one rank-r matmul per layer, at the start of the call)

so a decode step is one plain `F.linear` per projection. The copies are freed when the call ends: the adapter
changes with every optimizer step, so a copy never outlives the call.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from qlora_kit.speed.lora_autograd import dequantized_weight, in_compute_dtype


@dataclass
class MergedLayers:
    """What one `merged_lora_weights` did: layers merged, layers left on their own forward (by reason), the copies'
    size and the seconds it took to build them."""

    merged: int = 0
    left: Counter = field(default_factory=Counter)
    copy_bytes: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        left = "".join(f"; {count} left on their own forward ({why})" for why, count in self.left.items())
        return (f"{self.merged} LoRA layers over 4-bit weights merged into {self.copy_bytes / 2**30:.2f} GiB of "
                f"compute-dtype copies in {self.seconds:.3f} s{left}")


def unmergeable(layer) -> str | None:
    """Why one merged weight would not compute what this peft LoRA layer computes now, or None when it would: one
    active plain-LoRA adapter (no DoRA or other variant, no LoRA bias), not merged or disabled, no dropout acting
    (peft's dropout runs whenever the layer is in train mode, as trl's sampling is), no device hook, and a set compute
    dtype. Anything else keeps its forward, so the layer computes exactly what it did."""
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapter already merged"
    if len(layer.active_adapters) != 1:
        return "several active adapters"
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant:
        return "a LoRA variant (DoRA, ...)"
    if layer.lora_B[name].bias is not None:
        return "a LoRA bias"
    if layer.training and not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return "LoRA dropout in train mode"
    if hasattr(layer, "_hf_hook") or hasattr(layer.get_base_layer(), "_hf_hook"):
        return "an accelerate device hook"
    if layer.get_base_layer().compute_dtype is None:
        return "no compute dtype set"
    return None


def merged_weight(layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dequantize(W4) + s B A and the base bias, in the 4-bit layer's compute dtype (as bitsandbytes computes it):
    the adapter weights cast as the fused LoRA path casts them, added to the fresh dequantized weight in one addmm."""
    name = layer.active_adapters[0]
    base = layer.get_base_layer()
    dtype = base.compute_dtype
    weight = dequantized_weight(base, dtype)
    a = in_compute_dtype(layer.lora_A[name].weight, dtype, cast_once=False)
    b = in_compute_dtype(layer.lora_B[name].weight, dtype, cast_once=False)
    weight.addmm_(b, a, alpha=layer.scaling[name])
    return weight, None if base.bias is None else base.bias.to(dtype)


def merged_forward(weight: torch.Tensor, bias: torch.Tensor | None, own_forward: Callable) -> Callable:
    """The layer's forward on its merged weight: input in the compute dtype, output in the input's dtype (as
    bitsandbytes' and peft's forwards return it). A call with peft's extra arguments (mixed adapter batches) takes
    the layer's own forward."""

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:
            return own_forward(x, *args, **kwargs)
        return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)

    return forward


def run_on_merged_weight(layer) -> int:
    """Bind the layer's forward to its merged weight; returns the copy's bytes. The copy lives only in that forward
    (no frame of the caller holds it), so restoring the forward frees it, also while a traceback is kept."""
    weight, bias = merged_weight(layer)
    layer.forward = merged_forward(weight, bias, layer.forward)
    return weight.numel() * weight.element_size()


@contextlib.contextmanager
def merged_lora_weights(model: torch.nn.Module) -> Iterator[MergedLayers]:
    """Inside: every mergeable peft LoRA layer over a bitsandbytes 4-bit weight runs on its merged weight (see the
    module docstring). On leaving, also by an exception, each layer's forward is the one it had (peft's, or the
    fused LoRA forward the speed plan bound) and the copies are dropped."""
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    done = MergedLayers()
    swapped: list[tuple[torch.nn.Module, Callable | None]] = []  # (layer, its instance forward or None)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for layer in model.modules():
                if not isinstance(layer, PeftLinear4bit):
                    continue
                why = unmergeable(layer)
                if why is not None:
                    done.left[why] += 1
                    continue
                own = layer.__dict__.get("forward")
                done.copy_bytes += run_on_merged_weight(layer)
                swapped.append((layer, own))
                done.merged += 1
        if swapped and swapped[0][0].get_base_layer().weight.is_cuda:
            torch.cuda.synchronize()  # the build's own time, not the first decode step's
        done.seconds = time.perf_counter() - start
        yield done
    finally:
        for layer, forward in reversed(swapped):
            if forward is None:
                del layer.forward  # the class's forward again
            else:
                layer.forward = forward
