"""Which of PyTorch's SDPA kernels runs the model's attention: cuDNN's only where every batch has one shape and it
is measured faster there.

On Hopper, PyTorch (2.9 to 2.11 at least) tries cuDNN's attention before FlashAttention. cuDNN builds an execution
plan for every new set of shapes and strides (torch caches it per thread): seconds per build, so batches padded to
their longest row, which take a new length almost every step, spent most of their step building plans
(docs/benchmarks.md); FlashAttention builds nothing. Where every batch has one shape, the plan is built once and
cuDNN is the faster kernel at the shapes measured, so there the speed plan times both on the run's own shape, layout
and GPU, host time included, and keeps cuDNN on only where it is not the slower one (no rule by head counts would
survive the next cuDNN or torch release).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qlora_kit.model import attention_dropout

log = logging.getLogger("qlora_kit")

MEASURED_CALLS = 6  # forward + backward pairs timed per kernel, after two untimed ones (cuDNN builds its graph)
MARGIN = 1.05  # flash must beat cuDNN by 5% to switch cuDNN off: below that, timing noise decides
LONGEST_TIMED = 8192  # tokens a row: longer rows are timed at this length (a long-context run would wait seconds)


@dataclass(frozen=True)
class AttentionShape:
    """One decoder layer's attention call as the model makes it."""

    batch: int
    tokens: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool
    dtype: torch.dtype

    @classmethod
    def of(cls, config, batch: int, tokens: int, dtype: torch.dtype) -> AttentionShape:
        text = config.get_text_config()
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(batch=batch, tokens=min(tokens, LONGEST_TIMED), hidden=text.hidden_size, heads=heads,
                   kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   qkv_bias=bool(getattr(text, "attention_bias", False) or text.model_type == "qwen2"),
                   dtype=dtype)

    def describe(self) -> str:
        return (f"{self.batch} x {self.tokens} tokens, {self.heads} heads over {self.kv_heads} key/value heads of "
                f"{self.head_dim}")


def seconds_per_call(shape: AttentionShape, backend) -> float | None:
    """Wall seconds of one causal attention forward + backward through `backend` alone, the projections laid out as
    transformers' decoders make them (a linear's output viewed as heads and transposed) and GQA as transformers'
    sdpa_attention_forward passes it (enable_gqa); None if that kernel cannot run the shape. No synchronisation
    between calls, so a kernel whose host work outlasts its GPU work is timed by its host work, as in training."""
    from torch.nn.attention import sdpa_kernel

    device, generator = torch.device("cuda"), torch.Generator("cuda").manual_seed(0)
    x = torch.randn(shape.batch, shape.tokens, shape.hidden, device=device, dtype=shape.dtype, generator=generator)

    def projection(heads: int) -> torch.Tensor:
        weight = torch.randn(heads * shape.head_dim, shape.hidden, device=device, dtype=shape.dtype,
                             generator=generator) * shape.hidden ** -0.5
        bias = torch.zeros(heads * shape.head_dim, device=device, dtype=shape.dtype) if shape.qkv_bias else None
        return weight.requires_grad_(), bias

    weights = [projection(shape.heads), projection(shape.kv_heads), projection(shape.kv_heads)]

    def call() -> None:
        q, k, v = (torch.nn.functional.linear(x, w, b).view(shape.batch, shape.tokens, -1, shape.head_dim)
                   .transpose(1, 2) for w, b in weights)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                               enable_gqa=shape.heads != shape.kv_heads)
        out.sum().backward()

    try:
        with sdpa_kernel([backend]):
            call(), call()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(MEASURED_CALLS):
                call()
            torch.cuda.synchronize()
    except RuntimeError:  # "No available kernel": this backend does not take the shape
        return None
    finally:
        torch.cuda.empty_cache()
    return (time.perf_counter() - start) / MEASURED_CALLS


def choose_attention_kernel(setting: str, shape: AttentionShape | None, notes: list[str],
                            timer: Callable[[AttentionShape, object], float | None] = seconds_per_call,
                            varying_lengths: str | None = None) -> str:
    """speed.attention_kernel resolved: "default" (PyTorch's own order: cuDNN first where it runs) or "flash"
    (cuDNN's attention off for the run). `shape` None: no GPU or not sdpa attention, nothing to time.
    `varying_lengths`: why the training batches take many lengths (data.varying_batch_lengths); then flash, untimed."""
    if setting != "auto":
        return setting
    if shape is None:  # eager attention's auto was resolved before the memory estimates (resolve_eager_attention)
        return "default"
    if not torch.backends.cuda.cudnn_sdp_enabled():
        notes.append("attention_kernel: auto -> flash (cuDNN's attention is already off in this process)")
        return "flash"
    if varying_lengths:
        notes.append(f"attention_kernel: auto -> flash ({varying_lengths}; cuDNN's attention builds a new plan, "
                     "seconds each, for every new length)")
        return "flash"
    from torch.nn.attention import SDPBackend

    cudnn, flash = timer(shape, SDPBackend.CUDNN_ATTENTION), timer(shape, SDPBackend.FLASH_ATTENTION)
    if cudnn is None or flash is None:
        chosen = "flash" if cudnn is None and flash is not None else "default"
        notes.append(f"attention_kernel: auto -> {chosen} ({'cuDNN' if cudnn is None else 'flash'} attention cannot "
                     f"run {shape.describe()})")
        return chosen
    chosen = "flash" if flash * MARGIN < cudnn else "default"
    notes.append(f"attention_kernel: auto -> {chosen} (forward + backward of one layer's attention, "
                 f"{shape.describe()}: cuDNN {cudnn * 1e3:.2f} ms, flash {flash * 1e3:.2f} ms)")
    return chosen


def apply_attention_kernel(kernel: str) -> bool | None:
    """cuDNN's SDPA off when the plan chose flash (PyTorch then takes FlashAttention). A process-wide switch: returns
    the setting it replaced (None: nothing changed), which `restore_attention_kernel` puts back when training ends,
    so a second run in the same process (a notebook, the tests) starts from PyTorch's own order and times again."""
    if kernel != "flash" or not torch.cuda.is_available() or not torch.backends.cuda.cudnn_sdp_enabled():
        return None
    torch.backends.cuda.enable_cudnn_sdp(False)
    log.info("speed.attention_kernel: cuDNN's attention off, FlashAttention runs the model's sdpa attention")
    return True


def restore_attention_kernel(before: bool | None) -> None:
    if before is not None:
        torch.backends.cuda.enable_cudnn_sdp(before)


# ------------------------------------------------------------------------------------ flex attention for eager models


def flex_attention_blocker(model_config, gpus: int, processes: int) -> str | None:
    """Why `speed.attention_kernel: auto` leaves an eager-attention model on eager, or None when flex attention runs
    its training. Measured on Gemma 2 (one H200, docs/benchmarks.md): eager keeps rows x heads x length^2 scores a
    layer, flex none, at the same scores (the soft cap is a score_mod in transformers' flex path)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if not gpus:
        return "no GPU: PyTorch's flex attention has no backward on CPU"
    if processes > 1:
        return "several processes, where it has not been measured"
    if attention_dropout(model_config):
        return "the model's config sets attention dropout, which flex attention has not"
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(model_config), None)
    if model_class is None or not getattr(model_class, "_supports_flex_attn", False):
        return f"transformers has no flex attention path for {model_class.__name__ if model_class else 'this model'}"
    return None


def set_attention_implementation(model, implementation: str) -> str:
    """The model's attention implementation switched (transformers' own paths: under flex its masks become
    BlockMasks, a soft cap a score_mod); returns the one it replaced, which the same call puts back."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    base.set_attn_implementation(implementation)
    return before
