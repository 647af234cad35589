"""Checkpoint functions that decoder layers call in place of torch's non-reentrant checkpointing (patches.py installs
them, plan.py decides which): reentrant, and reentrant with each layer's input offloaded to CPU memory."""

from __future__ import annotations

import torch


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
