"""Shared-prefix pair forward (speed.shared_prefix): DPO / ORPO / SimPO run each pair's common prefix once.

trl concatenates a batch of B pairs as [chosen rows; rejected rows] (input_ids [2B, L]) and runs the decoder on all
2B rows, so every prompt is computed twice (and twice more in DPO's reference pass). A hidden state at a position
depends only on the tokens up to it, so the longest common prefix of the two rows of a pair gives the same hidden
states in both: here each pair becomes one packed row [prefix | chosen suffix | rejected suffix] with positions
0..s-1, s..s+c-1, s..s+r-1 and a mask in which each suffix sees the prefix and itself (never the other suffix); the
decoder's own forward runs on the B packed rows and the hidden states are put back in the [2B, L] layout trl reads.
Exact for any two rows (Wang et al. 2024, "prefix sharing", arXiv 2410.20305); the unchanged forward runs whenever a
batch is not B right-padded pairs of plain token ids. Padding positions come back as zeros, not as the pad token's
hidden state: no loss reads them, nor the logged logit means (trainers.ChunkedPairLogProbs leaves padding out).

The mask is one function over per-row segment ids and positions (`pair_mask_function`): a dense 4D mask for sdpa
(bool) and eager (additive), or on a GPU a flex attention BlockMask run by `flex_or_sdpa_attention`, so attention
skips the masked blocks instead of falling off sdpa's flash kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from qlora_kit.recipe import QloraKitError
from qlora_kit.speed.patches import rebind_forward

log = logging.getLogger("qlora_kit")

PREFIX, CHOSEN, REJECTED, PADDING = 0, 1, 2, 3  # segment ids of a packed row
FLEX_ATTENTION = "qlora_kit_flex_sdpa"  # the attention implementation `use_flex_attention_for_pairs` registers
FLEX_BLOCK = 128  # flex attention's block size: packed rows on the flex path are a whole number of blocks
DENSE_MULTIPLE = 8  # packed rows for a dense mask: a multiple of 8 tokens

_sharing = contextvars.ContextVar("qlora_kit_pairs_share_prefix", default=False)


@contextlib.contextmanager
def pairs_share_prefix() -> Iterator[None]:
    """While inside, a decoder rebound by `share_pair_prefixes` reads a [2B, L] batch as B (chosen, rejected) pairs.
    The pair trainers enter it around `compute_loss`; any other call (generation, evaluation of an SFT model, a
    user's own forward) runs the decoder unchanged."""
    token = _sharing.set(True)
    try:
        yield
    finally:
        _sharing.reset(token)


# -------------------------------------------------------------------------------------------------- packing


@dataclass(frozen=True)
class PairPacking:
    """B pairs packed into B rows: what the decoder runs on, and where each of the 2B rows' tokens came from."""

    input_ids: torch.Tensor  # [B, P] packed tokens
    position_ids: torch.Tensor  # [B, P] each token's position in its own (unpacked) row; 0 on padding
    segments: torch.Tensor  # [B, P] PREFIX, CHOSEN, REJECTED or PADDING
    source: torch.Tensor  # [2B, L] index into the packed rows flattened to [B * P] (0 where `valid` is False)
    valid: torch.Tensor  # [2B, L] the token is a real token (not padding) of its row


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, multiple: int) -> PairPacking | None:
    """The packing of [chosen rows; rejected rows], or None where it does not apply or saves nothing: an odd number
    of rows, a row that is not right-padded, no pair with a common prefix, or packed rows no shorter in total."""
    rows, length = input_ids.shape
    if rows % 2 or rows == 0:
        return None
    pairs, device = rows // 2, input_ids.device
    t = torch.arange(length, device=device)
    if attention_mask is None:
        lengths = torch.full((rows,), length, device=device)
    else:
        valid = attention_mask.bool()
        lengths = valid.sum(1)
        if not torch.equal(valid, t < lengths[:, None]):  # left padding, or holes
            return None
    chosen_len, rejected_len = lengths[:pairs], lengths[pairs:]
    same = (input_ids[:pairs] == input_ids[pairs:]) & (t < torch.minimum(chosen_len, rejected_len)[:, None])
    shared = same.long().cumprod(1).sum(1)  # the longest common prefix of each pair
    chosen_tail, rejected_tail = chosen_len - shared, rejected_len - shared
    packed_length = round_up(int((shared + chosen_tail + rejected_tail).max()), multiple)
    if not bool(shared.any()) or pairs * packed_length >= rows * length:
        return None

    u = torch.arange(packed_length, device=device)[None]
    s, c, r = shared[:, None], chosen_tail[:, None], rejected_tail[:, None]
    pair = torch.arange(pairs, device=device)[:, None]
    in_chosen_row = u < s + c  # prefix, then the chosen suffix: the chosen row's own first tokens
    in_rejected = ~in_chosen_row & (u < s + c + r)
    padding = ~in_chosen_row & ~in_rejected
    source_row = torch.where(in_chosen_row, pair, pair + pairs)
    source_column = torch.where(in_chosen_row, u, u - c).masked_fill(padding, 0)
    packed_ids = input_ids[source_row.masked_fill(padding, 0), source_column]
    segments = torch.where(u < s, PREFIX, torch.where(in_chosen_row, CHOSEN, torch.where(in_rejected, REJECTED,
                                                                                          PADDING)))
    start = pair * packed_length
    back = torch.cat([start + t, start + torch.where(t < s, t, t + c)])  # chosen rows, then rejected rows
    valid_back = t < lengths[:, None]
    return PairPacking(input_ids=packed_ids, position_ids=source_column, segments=segments,
                       source=back.masked_fill(~valid_back, 0), valid=valid_back)


def unpack_hidden_states(packed: torch.Tensor, packing: PairPacking) -> torch.Tensor:
    """[B, P, d] packed hidden states as [2B, L, d] rows, zeros on padding. A gather: its backward adds up the
    gradients a prefix token gets from the chosen and the rejected row."""
    flat = packed.reshape(-1, packed.shape[-1])
    rows = flat.index_select(0, packing.source.reshape(-1)).view(*packing.source.shape, -1)
    return rows.masked_fill(~packing.valid[..., None], 0)


# -------------------------------------------------------------------------------------------------- masks


def pair_mask_function(segments: torch.Tensor, positions: torch.Tensor, window: int | None) -> Callable:
    """mask(b, h, q, kv): may query q of packed row b see key kv. Causal within the prefix; each suffix sees the
    prefix and itself causally, never the other suffix; `window` (a sliding-window layer) limits keys to positions
    q - window < p <= q, on the rows' own positions, as the unpacked rows have it; a padding query sees only itself
    (no row without a visible key, so nothing is NaN)."""

    def mask(b, h, q, kv):
        segment_q, segment_kv = segments[b, q], segments[b, kv]
        visible = (kv <= q) & ((segment_kv == PREFIX) | (segment_kv == segment_q)) & (segment_q != PADDING)
        if window is not None:
            visible = visible & (positions[b, kv] > positions[b, q] - window)
        return visible | ((kv == q) & (segment_q == PADDING))

    return mask


def dense_mask(mask: Callable, pairs: int, length: int, device: torch.device, additive: torch.dtype | None
               ) -> torch.Tensor:
    """The mask function over every (q, kv) of B packed rows: [B, 1, P, P], bool (sdpa) or, with `additive`, 0 where
    visible and the dtype's minimum elsewhere (eager attention adds it to the scores)."""
    index = torch.arange(length, device=device)
    b = torch.arange(pairs, device=device)[:, None, None, None]
    visible = mask(b, torch.zeros_like(b), index[None, None, :, None], index[None, None, None, :])
    if additive is None:
        return visible
    return torch.zeros(visible.shape, dtype=additive, device=device).masked_fill(~visible,
                                                                                  torch.finfo(additive).min)


def layer_windows(config) -> dict[str, int | None] | None:
    """{layer type: sliding window or None} of the decoder's attention layers, or None for a layer type the pair
    mask does not cover (chunked, linear attention). A config without layer_types has one kind of layer, sliding
    where it sets sliding_window (Mistral, Phi-3: create_sliding_window_causal_mask)."""
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return {"all": getattr(config, "sliding_window", None)}
    windows = {"full_attention": None, "sliding_attention": getattr(config, "sliding_window", None)}
    if not set(layer_types) <= windows.keys():
        return None
    return {kind: windows[kind] for kind in dict.fromkeys(layer_types)}


def pair_attention_masks(config, packing: PairPacking, dtype: torch.dtype):
    """The masks the decoder's layers read for the packed rows: one 4D mask, or {layer type: mask} where the decoder
    mixes full and sliding-window layers (transformers 5 decoders take such a prepared mapping as it is). None when
    the attention implementation or a layer type is not covered."""
    windows = layer_windows(config)
    implementation = config._attn_implementation
    if windows is None or implementation not in ("sdpa", "eager", FLEX_ATTENTION):
        return None
    pairs, length = packing.input_ids.shape
    device = packing.input_ids.device
    # flex attention has no attention dropout: a model that trains with it gets the dense mask (and sdpa)
    flex = implementation == FLEX_ATTENTION and not getattr(config, "attention_dropout", 0)
    masks = {}
    for kind, window in windows.items():
        function = pair_mask_function(packing.segments, packing.position_ids, window)
        if flex:
            from torch.nn.attention.flex_attention import create_block_mask

            masks[kind] = create_block_mask(function, pairs, None, length, length, device=device)
        else:
            masks[kind] = dense_mask(function, pairs, length, device, dtype if implementation == "eager" else None)
    if "sliding_attention" in masks:  # the decoder picks each layer's mask by its type
        return masks
    [mask] = masks.values()
    return mask


# -------------------------------------------------------------------------------------------------- decoder

# transformers offers: the decoder's forward on [2B, L] rows, every pair's prompt computed in both of its rows.
# Why not: the common prefix once per pair cuts a third of the decoder FLOPs at prompt 1024 + answers 512 + 512.
# Internal touched: the decoder's (model.get_decoder()) forward, given a 4D mask / mask mapping and position_ids.

# Keyword arguments a pair batch may carry; any other, or one of these set, runs the decoder unchanged.
NEUTRAL_KWARGS = ("position_ids", "cache", "past_key_values", "inputs_embeds", "output_attentions",
                  "output_hidden_states", "output_router_logits")


def shared_prefix_forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                          **kwargs):
    """The decoder's forward; inside `pairs_share_prefix()`, on B right-padded pairs of token ids, run on the packed
    rows, with last_hidden_state put back as [2B, L, d] (zeros on padding positions, whose labels trl masks)."""
    packing = masks = None
    if _sharing.get() and pair_batch(self, input_ids, attention_mask, kwargs):
        flex = self.config._attn_implementation == FLEX_ATTENTION
        packing = pack_pairs(input_ids, attention_mask, FLEX_BLOCK if flex else DENSE_MULTIPLE)
        if packing is not None:
            masks = pair_attention_masks(self.config, packing, self.get_input_embeddings().weight.dtype)
    if masks is None:
        return self._unshared_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    kwargs = {key: value for key, value in kwargs.items() if key not in (*NEUTRAL_KWARGS, "use_cache")}  # all unset
    outputs = self._unshared_forward(input_ids=packing.input_ids, attention_mask=masks,
                                     position_ids=packing.position_ids, use_cache=False, **kwargs)
    outputs.last_hidden_state = unpack_hidden_states(outputs.last_hidden_state, packing)
    return outputs


def pair_batch(decoder, input_ids: torch.Tensor | None, attention_mask, kwargs: dict) -> bool:
    """Whether this call is plain token ids with at most a 2D padding mask and no cache: nothing (positions, a
    cache, embeddings, extra outputs) that the packed rows would change."""
    if input_ids is None or input_ids.dim() != 2 or (attention_mask is not None and attention_mask.dim() != 2):
        return False
    use_cache = kwargs.get("use_cache")
    if use_cache or (use_cache is None and decoder.config.use_cache and not decoder.training):
        return False
    others = {key: value for key, value in kwargs.items() if key not in ("use_cache", "return_dict")}
    return kwargs.get("return_dict") is not False and all(
        key in NEUTRAL_KWARGS and (value is None or value is False) for key, value in others.items())


def share_pair_prefixes(model) -> bool:
    """Rebind the decoder's forward (model.get_decoder(): LlamaModel, Qwen2Model, ...) to the shared-prefix pair
    forward; returns False when it was rebound before. It acts only inside `pairs_share_prefix()`."""
    decoder = model.get_decoder()
    if decoder is None or not hasattr(decoder, "config"):
        raise QloraKitError(f"speed.shared_prefix: {type(model).__name__} has no decoder module (get_decoder); set "
                            "speed.shared_prefix: false")
    return rebind_forward(decoder, shared_prefix_forward, "_unshared_forward")


# -------------------------------------------------------------------------------------------------- flex attention

# transformers offers: attn_implementation="flex_attention", whose wrapper compiles flex_attention with
# mode="max-autotune-no-cudagraphs" and dynamic=False in training: minutes of autotuning for every new row length.
# Why not: one compile with dynamic=True serves every packed length. Internal touched: AttentionInterface and
# AttentionMaskInterface (registered names), the model's attn implementation while the lever is on.


@functools.cache
def compiled_flex_attention() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_or_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask, dropout: float = 0.0, scaling: float | None = None,
                           softcap: float | None = None, **kwargs):
    """Flex attention when the mask is a BlockMask (the packed pair rows), transformers' sdpa for any other call.
    query [b, h, q, d], key / value [b, kv_heads, k, d] (grouped-query heads shared); returns [b, q, h, d]."""
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(attention_mask, BlockMask):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      softcap=softcap, **kwargs)
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q, kv):
            return softcap * torch.tanh(score / softcap)

    # inside a compiled decoder layer (speed.compile_layers) dynamo traces flex_attention itself
    flex = flex_attention_eager() if torch.compiler.is_compiling() or not query.is_cuda else compiled_flex_attention()
    output = flex(query, key, value, score_mod=score_mod, block_mask=attention_mask, scale=scaling,
                  enable_gqa=query.shape[1] != key.shape[1])
    return output.transpose(1, 2).contiguous(), None


def flex_attention_eager() -> Callable:
    """flex_attention itself: what a compiled layer traces, and on CPU (forward only, no backward there) the check of
    the BlockMask path."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def use_flex_attention_for_pairs(model) -> None:
    """Register `flex_or_sdpa_attention` (with sdpa's mask builder for ordinary calls) and switch the model to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FLEX_ATTENTION, flex_or_sdpa_attention)
    AttentionMaskInterface.register(FLEX_ATTENTION, sdpa_mask)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(FLEX_ATTENTION)
