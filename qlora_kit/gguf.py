"""Write a run as GGUF (merged model or LoRA adapter) or as an Ollama folder, with the `gguf` package and no llama.cpp
build, and check every file against the model it came from before it is published.

Tensor names, metadata keys and the per-architecture changes follow llama.cpp's convert_hf_to_gguf.py and
convert_lora_to_gguf.py (read at ggml-org/llama.cpp 0024aa7); names come from `gguf.get_tensor_name_map`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from qlora_kit.export import CHECK_PROMPTS, merge_adapter
from qlora_kit.recipe import ExportSection, QloraKitError, read_run_recipe
from qlora_kit.rundir import (
    damaged_merged,
    make_parent_folder,
    refuse_path_under_file,
    saved_part_errors,
    trained_adapter,
)

log = logging.getLogger("qlora_kit")

FORMATS = ("gguf", "gguf-lora", "ollama")
# HF architecture -> llama.cpp architecture. Mistral and SmolLM2 are the llama architecture in llama.cpp too.
ARCHITECTURES = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
    "Qwen3ForCausalLM": gguf.MODEL_ARCH.QWEN3,
    "Gemma2ForCausalLM": gguf.MODEL_ARCH.GEMMA2,
    "Gemma3ForCausalLM": gguf.MODEL_ARCH.GEMMA3,
    "Gemma3ForConditionalGeneration": gguf.MODEL_ARCH.GEMMA3,
    "Phi3ForCausalLM": gguf.MODEL_ARCH.PHI3,
}
Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
# The types gguf.quants can write in pure Python (k-quants and i-quants need llama.cpp's llama-quantize).
QUANT_TYPES = {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
               "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q5_1": (Q.Q5_1, F.MOSTLY_Q5_1), "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0),
               "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0)}
FOUR_AND_FIVE_BIT = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
LORA_QUANT_TYPES = ("f32", "f16", "bf16")
# The GGUF read back must compute what the merged model with the same rounded weights computes: only summation order
# may differ. Relative to the largest |logit|; docs/export.md has the measurements.
EXPORT_TOLERANCE = 1e-4
GREEDY_TOKENS = 16  # continuation compared on each check prompt (qlora_kit.export.CHECK_PROMPTS)


# ------------------------------------------------------------------------------------------------ entry point


def export_run(run_dir: str | Path, fmt: str, quant: str | None = None, out: str | Path | None = None,
               force: bool = False) -> Path:
    """`qlora-kit export`: the merged model as GGUF, the adapter as a llama.cpp LoRA GGUF, or an Ollama folder."""
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise QloraKitError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    read_run_recipe(run_dir)  # a path that is not a run folder: that message, before any output path is read
    if fmt == "gguf-lora":
        quant = quant or "f16"
        if quant not in LORA_QUANT_TYPES:
            raise QloraKitError(f"--quant {quant}: a LoRA GGUF is written as {', '.join(LORA_QUANT_TYPES)}")
        target = Path(out) if out else run_dir / "gguf" / f"adapter-{quant}.gguf"
        refuse_existing(target, force, folder=False)
        return export_lora(run_dir, target, quant)
    quant = quant or "q8_0"
    if quant not in QUANT_TYPES:
        raise QloraKitError(f"--quant {quant}: choose one of {', '.join(QUANT_TYPES)} (k-quants such as q4_k_m need "
                            "llama.cpp's llama-quantize, run on the f16 file)")
    default = run_dir / "ollama" if fmt == "ollama" else run_dir / "gguf" / f"model-{quant}.gguf"
    target = Path(out) if out else default
    refuse_existing(target, force, folder=fmt == "ollama")
    with merged_model(run_dir) as merged:
        if fmt == "gguf":
            return export_gguf(merged, target, quant)
        return export_ollama(run_dir, merged, target, quant)


def export_after_training(run_dir: Path, export: ExportSection) -> None:
    """The recipe's export.gguf / export.ollama, after the merge; a run folder's own exports are replaced."""
    if export.gguf is not None:
        export_run(run_dir, "gguf", export.gguf.quant, force=True)
    if export.ollama:
        export_run(run_dir, "ollama", export.gguf.quant if export.gguf else None, force=True)


def refuse_existing(target: Path, force: bool, folder: bool) -> None:
    """An existing output is replaced only with --force, and only where it is a qlora-kit export: a GGUF file with
    the `<stem>.check.json` its check wrote beside it, an Ollama folder with its gguf_check.json (or an empty
    folder). Anything else at `--out` is the user's, and stays. An --out under a file is refused here too, before
    the merge and the export run."""
    refuse_path_under_file(target)
    if not target.exists() and not target.is_symlink():
        return
    if not force:
        raise QloraKitError(f"{target} already exists; pass --force to replace it, or --out for another path")
    if folder and not target.is_dir():
        raise QloraKitError(f"{target} is a file; --out names the folder the Ollama files go in")
    if not folder and target.is_dir():
        raise QloraKitError(f"{target} is a folder; --out names the .gguf file to write")
    signature = target / "gguf_check.json" if folder else target.with_name(f"{target.stem}.check.json")
    if not signature.is_file() and not (folder and not any(target.iterdir())):
        raise QloraKitError(f"{target} is not an export qlora-kit wrote (no {signature.name} "
                            f"{'in it' if folder else 'beside it'}); --force replaces only qlora-kit's own exports. "
                            "Pass another --out, or move it away yourself")


@contextlib.contextmanager
def merged_model(run_dir: Path) -> Iterator[Path]:
    """RUN_DIR/merged if it exists (read through first: a damaged one is the user's message, not a traceback from
    the writer), else a merge into a temporary folder inside the run, removed afterwards."""
    if (run_dir / "merged" / "config.json").is_file():
        check_merged_folder(run_dir / "merged", run_dir)
        yield run_dir / "merged"
        return
    log.info("no merged model in %s; merging into a temporary folder first", run_dir)
    temporary = Path(tempfile.mkdtemp(prefix=".gguf-merge-", dir=run_dir))
    try:
        yield Path(merge_adapter(run_dir, out=temporary / "merged"))
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def check_merged_folder(merged: Path, run_dir: Path) -> None:
    """The merged folder's config, tokenizer and safetensors headers read as the writer will read them."""
    from transformers import AutoConfig, AutoTokenizer

    with saved_part_errors(merged, "the merged model", damaged_merged(run_dir)):
        AutoConfig.from_pretrained(merged)
        AutoTokenizer.from_pretrained(merged)
        if not (merged / "tokenizer.json").is_file():
            raise ValueError("no tokenizer.json")
        if not parameter_count(merged):
            raise ValueError("no weights (*.safetensors)")


# --------------------------------------------------------------------------------------------- model -> GGUF


@dataclass
class Architecture:
    """What the writer needs from an HF config: the llama.cpp architecture and the text model's hyperparameters."""

    hf_name: str
    arch: gguf.MODEL_ARCH
    config: Any  # the text config (Gemma 3's multimodal config holds it as text_config)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


def architecture_of(config) -> Architecture:
    names = config.architectures or []
    known = [n for n in names if n in ARCHITECTURES]
    if not known:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise QloraKitError(f"GGUF export does not support {', '.join(names) or config.model_type} (supported: "
                            f"{supported}); export the merged safetensors folder and convert it with llama.cpp's "
                            "convert_hf_to_gguf.py")
    return Architecture(known[0], ARCHITECTURES[known[0]], config.get_text_config())


def hf_tensor_name(name: str) -> str | None:
    """The text model's tensor name in the plain causal-LM layout; None for vision tensors (Gemma 3)."""
    if name.startswith(("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.",
                        "multi_modal_projector.")):
        return None
    return name.replace("model.language_model.", "model.").replace("language_model.model.", "model.")


def permute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for Llama q/k rows (LlamaModel.permute in convert_hf_to_gguf.py)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    return (weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensor(arch: Architecture, name: str, data: np.ndarray,
                name_map: gguf.TensorNameMap) -> tuple[str, np.ndarray]:
    """One HF tensor as llama.cpp stores it: its name, and the q/k permutation or Gemma's +1 on norm weights."""
    gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise QloraKitError(f"GGUF export: no llama.cpp name for tensor {name} of {arch.hf_name}")
    config = arch.config
    if arch.arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config.num_attention_heads if name.endswith("q_proj.weight") else config.num_key_value_heads
        data = permute_rows(data, heads)
    if arch.arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3) and name.endswith("norm.weight"):
        data = data + 1  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp by the stored weight
    return gguf_name, data


def tensor_type(gguf_name: str, shape: tuple[int, ...], wanted: Q) -> Q:
    """convert_hf_to_gguf's rule: 1-D tensors and norms stay F32; rows that fill no whole blocks fall back to F16."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return Q.F32
    if wanted in FOUR_AND_FIVE_BIT and gguf_name in ("token_embd.weight", "output.weight"):
        return Q.Q8_0  # llama-quantize keeps these at q6_K; the nearest type gguf.quants writes is q8_0
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        return Q.F16
    return wanted


def by_rows(function: Callable[[np.ndarray], np.ndarray], data: np.ndarray) -> np.ndarray:
    """`function` over blocks of rows on every core, concatenated. gguf.quants works row-block by row-block in numpy,
    which releases the GIL, so threads give the same bytes several times faster (an 8B model is billions of values,
    quantized once to write and once more by the check)."""
    workers = min(16, os.cpu_count() or 1)
    if workers < 2 or data.ndim < 2 or data.shape[0] < 2 * workers or data.size < 1 << 20:
        return function(data)
    with ThreadPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(function, np.array_split(data, workers, axis=0))), axis=0)


def quantize(data: np.ndarray, qtype: Q) -> np.ndarray:
    """gguf.quants.quantize, row blocks in parallel."""
    return by_rows(lambda rows: gguf.quants.quantize(rows, qtype), data)


def round_trip(data: np.ndarray, qtype: Q) -> np.ndarray:
    """What a reader of the GGUF gets back for `data` stored as `qtype`."""
    if qtype == Q.F32:
        return data.astype(np.float32)
    return by_rows(lambda rows: gguf.quants.dequantize(gguf.quants.quantize(rows.astype(np.float32), qtype), qtype),
                   data)


def rope_parameters(config) -> dict[str, Any]:
    """transformers 5 keeps rope settings in `rope_parameters` (Gemma 3: one dict per attention type)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in rope:
        rope = dict(rope["full_attention"])
    return rope


def add_hyperparameters(writer: gguf.GGUFWriter, arch: Architecture, file_type: F) -> dict[str, np.ndarray]:
    """The `{arch}.*` metadata of convert_hf_to_gguf.py's TextModel and per-architecture classes; returns the extra
    tensors some rope variants need (Llama 3 rope_freqs, Phi-3 long/short factors)."""
    c, a = arch.config, arch.arch
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_file_type(file_type)
    rope = rope_parameters(c)
    if "rope_theta" in rope:
        writer.add_rope_freq_base(rope["rope_theta"])
    if a in (gguf.MODEL_ARCH.QWEN3, gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3) or hasattr(c, "head_dim"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    extra: dict[str, np.ndarray] = {}
    if a == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(c.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if a in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3) and c.sliding_window is not None:
        writer.add_sliding_window(c.sliding_window)
    if a == gguf.MODEL_ARCH.GEMMA2:
        writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
    original = (rope.get("original_max_position_embeddings") or getattr(c, "original_max_position_embeddings", None)
                or c.max_position_embeddings)
    if a == gguf.MODEL_ARCH.PHI3:
        rotary = int(getattr(c, "partial_rotary_factor", 1.0) * c.hidden_size) // c.num_attention_heads
        writer.add_rope_dimension_count(rotary)
        writer.add_sliding_window(c.sliding_window or 0)
        writer.add_rope_scaling_orig_ctx_len(original)
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return extra
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "llama3":
        # llama.cpp divides each rotary frequency by rope_freqs; transformers computes the scaled frequencies.
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](c, "cpu")
        plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = (plain / scaled).float().numpy()
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(original)
    elif kind == "longrope" and a == gguf.MODEL_ARCH.PHI3:
        scale = c.max_position_embeddings / original
        attn_factor = float(np.sqrt(1 + np.log(scale) / np.log(original))) if scale > 1.0 else 1.0
        writer.add_rope_scaling_attn_factors(attn_factor)
        for key, tensor in (("long_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
                            ("short_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
            extra[gguf.TENSOR_NAMES[tensor] + ".weight"] = np.asarray(rope[key], dtype=np.float32)
    else:
        raise QloraKitError(f"GGUF export: rope scaling {kind!r} of {arch.hf_name} is not supported (supported: "
                            "linear, llama3, yarn, Phi-3 longrope)")
    return extra


def write_model_gguf(merged: Path, path: Path, quant: str) -> dict[str, Q]:
    """Write the merged folder as one GGUF file; returns the storage type chosen for each HF tensor name."""
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(merged)
    arch = architecture_of(config)
    wanted, file_type = QUANT_TYPES[quant]
    writer = gguf.GGUFWriter(path, arch.name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(merged.parent.name if merged.name == "merged" else merged.name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    extra = add_hyperparameters(writer, arch, file_type)
    add_tokenizer(writer, merged, arch.config.vocab_size)

    name_map = gguf.get_tensor_name_map(arch.arch, arch.config.num_hidden_layers)
    tied = bool(getattr(arch.config, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))
    stored: dict[str, Q] = {}
    for file in sorted(merged.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = hf_tensor_name(key)
                if name is None or (tied and name == "lm_head.weight"):
                    continue
                data = handle.get_tensor(key).float().numpy()
                gguf_name, data = gguf_tensor(arch, name, data, name_map)
                qtype = tensor_type(gguf_name, data.shape, wanted)
                writer.add_tensor(gguf_name, quantize(data, qtype), raw_dtype=qtype)
                stored[name] = qtype
    for name, data in extra.items():
        writer.add_tensor(name, data, raw_dtype=Q.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


# ------------------------------------------------------------------------------------------------ tokenizer


def looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special: added tokens some models forget to mark special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<unused") and token.endswith(">")))


# tokenizer.json pre-tokenizer regex -> llama.cpp's `tokenizer.ggml.pre` name (llama-vocab.cpp). llama.cpp names
# pre-tokenizers by a hash of a test string's tokens (convert_hf_to_gguf_update.py); the regex identifies the same ones.
PRE_TOKENIZER_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+":
        "qwen2",
}


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer: Llama 3, Qwen 2, GPT-4o style, SmolLM or plain GPT-2."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    for step in steps:
        pattern = (step.get("pattern") or {}).get("Regex")
        if pattern in PRE_TOKENIZER_REGEXES:
            return PRE_TOKENIZER_REGEXES[pattern]
        if pattern and pattern.startswith("[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*"):
            return "gpt-4o"
    kinds = [step.get("type") for step in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    log.warning("GGUF export: unrecognised pre-tokenizer %s; llama.cpp will use its default one", kinds)
    return "default"


def adds_space_prefix(tokenizer_json: dict) -> bool:
    """Whether the SentencePiece-style tokenizer puts "▁" before the first word (Llama 2, Mistral: yes; Gemma: no);
    llama.cpp assumes yes unless `tokenizer.ggml.add_space_prefix` says otherwise."""
    steps = []
    for part in (tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer")):
        if part:
            steps += part.get("normalizers") or part.get("pretokenizers") or [part]
    for step in steps:
        if step.get("type") == "Prepend" and step.get("prepend") == "▁":
            return True
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never"
    return False


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, n_vocab: int) -> None:
    """Vocabulary, merges, special token ids and the chat template: byte-level BPE as llama.cpp's `gpt2` model,
    SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3) as its `llama` model."""
    from transformers import AutoTokenizer

    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    model = tokenizer_json["model"]
    if model["type"] != "BPE":
        raise QloraKitError(f"GGUF export: {folder}/tokenizer.json is a {model['type']} tokenizer; only BPE "
                            "tokenizers (byte-level or with byte fallback) are supported")
    if model.get("byte_fallback"):
        vocab = gguf.LlamaHfVocab(folder)
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(adds_space_prefix(tokenizer_json))
        load_merges = False
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        reverse = {i: t for t, i in tokenizer.get_vocab().items()}
        added = tokenizer.added_tokens_decoder
        tokens, scores, types = [], None, []
        for i in range(max(len(reverse), n_vocab)):
            if i not in reverse:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            elif i in added:
                tokens.append(reverse[i])
                control = added[i].special or looks_special(reverse[i])
                types.append(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(reverse[i])
                types.append(gguf.TokenType.NORMAL)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
        load_merges = True
    while len(tokens) < n_vocab:  # embedding rows beyond the tokenizer (padded vocabularies)
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(gguf.TokenType.UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=load_merges, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


# --------------------------------------------------------------------------------------------------- checks


@dataclass
class GGUFCheck:
    """How the GGUF read back by transformers compares with the merged model, on the check prompts."""

    file: str
    quant: str
    architecture: str
    max_abs_logit_diff_vs_rounded: float  # against the merged model with the same weight rounding: the export itself
    tolerance: float
    max_abs_logit_diff_vs_merged: float  # against the merged model as saved: what the quantization costs
    top1_agreement_vs_merged: float
    greedy_tokens_equal: bool
    tokenizer_ids_equal: bool | None
    config_mismatches: list[str]
    passed: bool
    greedy_merged: list[str] = field(default_factory=list)
    greedy_gguf: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)


def check_texts(tokenizer) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in CHECK_PROMPTS]


def check_inputs(tokenizer) -> dict[str, torch.Tensor]:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(check_texts(tokenizer), return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def logits_and_greedy(model, inputs: dict[str, torch.Tensor], tokenizer) -> tuple[torch.Tensor, list[list[int]]]:
    """Logits on the check prompts, and greedy continuations of all of them in one batch (left-padded)."""
    model.eval()
    logits = model(**inputs).logits.float()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(check_texts(tokenizer), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    out = model.generate(**batch, max_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return logits, out[:, batch["input_ids"].shape[1]:].tolist()


def check_model_gguf(merged: Path, path: Path, quant: str, stored: dict[str, Q]) -> GGUFCheck:
    """Load the GGUF back with transformers and compare logits and greedy tokens with the merged model.

    The export is judged against the merged model whose weights went through the same rounding (`stored` types), so
    one tolerance holds for every quant type; the distance to the unrounded model is recorded, not judged.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(merged)
    arch = architecture_of(config)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    inputs = check_inputs(tokenizer)
    mask = inputs["attention_mask"].bool()

    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    merged_logits, merged_greedy = logits_and_greedy(reference, inputs, tokenizer)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            key = hf_tensor_name(name)
            if key in stored:
                param.copy_(torch.from_numpy(round_trip(param.detach().numpy(), stored[key])).reshape(param.shape))
    rounded_logits = reference(**inputs).logits.float()
    del reference

    # The merged config, not the one transformers rebuilds from GGUF metadata: that one omits keys transformers does
    # not read (softcapping, rope scaling); the metadata it does read is compared below.
    with cached_tensor_name_maps():
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                      config=readback_config(arch), dtype=torch.float32)
    gguf_logits, gguf_greedy = logits_and_greedy(loaded, inputs, tokenizer)
    del loaded

    scale = max(1.0, rounded_logits[mask].abs().max().item())
    export_diff = (gguf_logits - rounded_logits).abs()[mask].max().item()
    quant_diff = (gguf_logits - merged_logits).abs()[mask].max().item()
    agreement = (gguf_logits.argmax(-1) == merged_logits.argmax(-1))[mask].float().mean().item()
    mismatches = config_mismatches(path, arch)
    tokenizer_equal = tokenizer_round_trip(path, tokenizer)
    tolerance = EXPORT_TOLERANCE * scale
    if tokenizer_equal is False:
        # transformers rebuilds a GGUF tokenizer per architecture (Qwen 2's digit splitting, whatever
        # tokenizer.ggml.pre says), so a difference may be its converter's; the metadata itself is tested in tests/.
        log.warning("the tokenizer transformers rebuilds from %s splits the check prompts differently from the "
                    "model's own tokenizer (recorded in the check)", path.name)
    passed = export_diff <= tolerance and not mismatches
    return GGUFCheck(
        file=path.name, quant=quant, architecture=arch.name, max_abs_logit_diff_vs_rounded=export_diff,
        tolerance=tolerance, max_abs_logit_diff_vs_merged=quant_diff, top1_agreement_vs_merged=agreement,
        greedy_tokens_equal=merged_greedy == gguf_greedy, tokenizer_ids_equal=tokenizer_equal,
        config_mismatches=mismatches, passed=passed,
        greedy_merged=[tokenizer.decode(g) for g in merged_greedy],
        greedy_gguf=[tokenizer.decode(g) for g in gguf_greedy],
        not_checked=not_read_by_transformers(arch))


@contextlib.contextmanager
def cached_tensor_name_maps() -> Iterator[None]:
    """transformers' GGUF loader offers no way to reuse the name table: get_gguf_hf_weights_map rebuilds
    gguf.get_tensor_name_map once per submodule (minutes for a 30-layer model on a busy CPU). It imports the function
    from `gguf` on each call, so a cached one is put there for the load (transformers 5.24, gguf 0.19)."""
    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def readback_config(arch: Architecture):
    """transformers' GGUF loader finds tensors by the config's model type; Mistral is stored as llama, so read it back
    as the Llama model it is to llama.cpp (the same layers; llama.cpp has no sliding window for it either)."""
    from transformers import LlamaConfig

    if arch.arch != gguf.MODEL_ARCH.LLAMA or arch.config.model_type == "llama":
        return arch.config
    settings = {k: v for k, v in arch.config.to_dict().items() if k not in ("model_type", "architectures")}
    return LlamaConfig(**settings, architectures=["LlamaForCausalLM"])


def config_mismatches(path: Path, arch: Architecture) -> list[str]:
    """The hyperparameters transformers reads from the GGUF metadata, compared with the merged model's config."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    read = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    wrong = []
    for key, value in read.items():
        if key in ("model_type", "_model_name_or_path", "architectures") or not hasattr(arch.config, key):
            continue
        expected = getattr(arch.config, key)
        if key == "rope_theta":
            expected = rope_parameters(arch.config).get("rope_theta")
        if expected is None or isinstance(expected, (dict, list)):
            continue
        if isinstance(expected, float) or isinstance(value, float):
            same = abs(float(value) - float(expected)) <= 1e-6 * max(1.0, abs(float(expected)))
        else:
            same = value == expected
        if not same:
            wrong.append(f"{key}: GGUF {value!r}, model {expected!r}")
    return wrong


def tokenizer_round_trip(path: Path, tokenizer) -> bool | None:
    """Does the tokenizer transformers builds from the GGUF metadata give the same ids on the check prompts?"""
    from transformers import AutoTokenizer

    texts = check_texts(tokenizer)
    try:
        loaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        log.warning("transformers cannot rebuild the tokenizer from %s (%s); token ids not compared", path.name, exc)
        return None
    return all(loaded(t, add_special_tokens=False).input_ids == tokenizer(t, add_special_tokens=False).input_ids
               for t in texts)


def not_read_by_transformers(arch: Architecture) -> list[str]:
    """Metadata written for llama.cpp that transformers' GGUF loader ignores, so the check above cannot see it."""
    keys = ["tokenizer.chat_template"]
    if arch.arch == gguf.MODEL_ARCH.GEMMA2:
        keys += ["attn_logit_softcapping", "final_logit_softcapping"]
    if rope_parameters(arch.config).get("rope_type", "default") != "default":
        keys.append("rope scaling")
    if arch.arch == gguf.MODEL_ARCH.PHI3:
        keys.append("rope.dimension_count (partial rotary)")
    return keys


# --------------------------------------------------------------------------------------------------- publish


def export_gguf(merged: Path, target: Path, quant: str) -> Path:
    """Write `target` (a .gguf file) and `<target stem>.check.json` next to it, after a passing check."""
    make_parent_folder(target)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        check = write_and_check(merged, partial / target.name, quant)
        write_json(partial / "gguf_check.json", asdict(check))
        os.replace(partial / target.name, target)
        os.replace(partial / "gguf_check.json", target.with_name(f"{target.stem}.check.json"))
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


# Host memory the check needs per parameter of the merged model: its fp32 references, then transformers' fp32
# read-back of the GGUF with the dequantized tensors beside it (measured, docs/export.md).
CHECK_HOST_BYTES_PER_PARAMETER = 9.5


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where the kernel does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def parameter_count(merged: Path) -> int:
    """Parameters in the merged folder's safetensors, from the file headers (no tensor is read)."""
    from safetensors import safe_open

    count = 0
    for file in merged.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                count += math.prod(handle.get_slice(key).get_shape())
    return count


def refuse_without_host_memory(merged: Path) -> None:
    """Stop before minutes of writing when the check cannot fit in memory: the kernel's OOM killer gives no message."""
    need = parameter_count(merged) * CHECK_HOST_BYTES_PER_PARAMETER
    available = available_host_bytes()
    if available is not None and need > available:
        raise QloraKitError(
            f"the GGUF export of {merged} needs about {need / 2**30:.0f} GiB of host memory for its check "
            f"(transformers reads the file back in fp32; docs/export.md) and {available / 2**30:.0f} GiB is "
            f"available: close other programs or export on a machine with more memory; nothing was written")


def write_and_check(merged: Path, path: Path, quant: str) -> GGUFCheck:
    refuse_without_host_memory(merged)
    log.info("writing %s (%s) from %s", path.name, quant, merged)
    stored = write_model_gguf(merged, path, quant)
    check = check_model_gguf(merged, path, quant, stored)
    if not check.passed:
        raise QloraKitError(
            f"GGUF check failed for {path.name}: logits differ from the merged model's (same rounding) by up to "
            f"{check.max_abs_logit_diff_vs_rounded:.3g} (tolerance {check.tolerance:.3g}); metadata mismatches: "
            f"{check.config_mismatches or 'none'}; tokenizer ids equal: {check.tokenizer_ids_equal}; nothing written")
    log.info("GGUF check passed: %s, max |logit diff| %.2e vs the same rounding, %.3g vs the merged model, top-1 "
             "agreement %.1f%%, greedy tokens %s", path.name, check.max_abs_logit_diff_vs_rounded,
             check.max_abs_logit_diff_vs_merged, 100 * check.top1_agreement_vs_merged,
             "equal" if check.greedy_tokens_equal else "differ")
    return check


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ LoRA GGUF


@dataclass
class LoraCheck:
    """The adapter GGUF read back with gguf.GGUFReader against the safetensors adapter."""

    file: str
    quant: str
    architecture: str
    alpha: float
    tensors: int
    max_abs_diff: float  # after undoing the q/k row permutation, against the adapter rounded to the stored type
    passed: bool


def lora_tensor_names(key: str) -> tuple[str, str] | None:
    """peft's `base_model.model.<module>.lora_A.weight` -> (`<module>.weight`, "a"); None for other tensors."""
    match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
    if match is None:
        return None
    return match.group(1) + ".weight", match.group(2).lower()


def export_lora(run_dir: Path, target: Path, quant: str) -> Path:
    """convert_lora_to_gguf.py's layout: general.type adapter, adapter.type lora, adapter.lora.alpha, and for each
    adapted weight `<llama.cpp name>.lora_a` ([r, in]) and `.lora_b` ([out, r]); llama.cpp scales by alpha / r."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from qlora_kit.model import base_model_folder

    recipe = read_run_recipe(run_dir)
    adapter, _ = trained_adapter(run_dir)
    settings = json.loads((adapter / "adapter_config.json").read_text())
    if settings.get("use_dora") or settings.get("rank_pattern") or settings.get("alpha_pattern") \
            or settings.get("modules_to_save"):
        raise QloraKitError(f"{adapter}: DoRA, per-layer rank/alpha and modules_to_save have no llama.cpp LoRA "
                            "form; export --format gguf (the merged model) instead")
    rank, alpha = settings["r"], float(settings["lora_alpha"])
    if settings.get("use_rslora"):
        alpha *= rank ** 0.5  # rsLoRA scales by alpha / sqrt(r); llama.cpp by alpha / r
    arch = architecture_of(AutoConfig.from_pretrained(base_model_folder(recipe.model)))
    weights = load_file(adapter / "adapter_model.safetensors")
    name_map = gguf.get_tensor_name_map(arch.arch, arch.config.num_hidden_layers)
    qtype = QUANT_TYPES[quant][0]

    make_parent_folder(target)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        path = partial / target.name
        writer = gguf.GGUFWriter(path, arch.name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(f"{run_dir.name} LoRA")
        expected: dict[str, np.ndarray] = {}
        for key in sorted(weights):
            names = lora_tensor_names(key)
            if names is None:
                raise QloraKitError(f"{adapter}: tensor {key} is not a LoRA A/B matrix; llama.cpp cannot load it")
            base, side = names
            data = weights[key].float().numpy()
            if side == "b":  # the base weight's rows are B's rows: permute them like the weight's
                gguf_name, data = gguf_tensor(arch, hf_tensor_name(base), data, name_map)
            else:
                gguf_name = name_map.get_name(hf_tensor_name(base), try_suffixes=(".weight",))
            name = f"{gguf_name}.lora_{side}"
            writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)
            expected[name] = round_trip(weights[key].float().numpy(), qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        check = check_lora_gguf(path, arch, expected, alpha, quant)
        if not check.passed:
            raise QloraKitError(f"LoRA GGUF check failed for {target.name}: tensors differ from the adapter by up to "
                                f"{check.max_abs_diff:.3g}; nothing written")
        os.replace(path, target)
        write_json(target.with_name(f"{target.stem}.check.json"), asdict(check))
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("LoRA GGUF written to %s (%d tensors, alpha %g); run it with: llama-cli -m BASE.gguf --lora %s",
             target, len(expected), alpha, target.name)
    return target


def check_lora_gguf(path: Path, arch: Architecture, expected: dict[str, np.ndarray], alpha: float,
                    quant: str) -> LoraCheck:
    """Every tensor read back (dequantized, q/k rows un-permuted) equals the adapter's, and the metadata says LoRA."""
    reader = gguf.GGUFReader(path)
    fields = {name: reader.fields[name].contents() for name in (gguf.Keys.General.TYPE, gguf.Keys.Adapter.TYPE,
                                                                gguf.Keys.Adapter.LORA_ALPHA)}
    worst, count = 0.0, 0
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(
            [int(d) for d in reversed(tensor.shape)])
        if arch.arch == gguf.MODEL_ARCH.LLAMA and tensor.name.endswith(("attn_q.weight.lora_b",
                                                                       "attn_k.weight.lora_b")):
            heads = arch.config.num_attention_heads if ".attn_q." in tensor.name else arch.config.num_key_value_heads
            data = unpermute_rows(data, heads)
        if tensor.name not in expected or data.shape != expected[tensor.name].shape:
            worst = float("inf")
            continue
        worst = max(worst, float(np.abs(data - expected[tensor.name]).max()))
        count += 1
    passed = (count == len(expected) == len(reader.tensors) and worst == 0.0 and fields[gguf.Keys.General.TYPE] ==
              "adapter" and fields[gguf.Keys.Adapter.TYPE] == "lora"
              and abs(fields[gguf.Keys.Adapter.LORA_ALPHA] - alpha) <= 1e-6 * alpha)
    return LoraCheck(path.name, quant, arch.name, alpha, count, worst, passed)


# ---------------------------------------------------------------------------------------------------- Ollama

# Placeholder contents: rendering the chat template with these shows the text the template puts around each message.
PROBE = "QLKPROBE{}X"
PROBE_ROLES = {"S": "system", "U": "user", "A": "assistant"}


@dataclass
class OllamaTemplate:
    """A Go TEMPLATE for Ollama built from a chat template: the text before each message (by the previous and the
    current role), and after the last one (with the generation prompt)."""

    before: dict[str, str]  # "prev>role" ("" for the first message) -> text before the message's content
    after: dict[str, str]  # role of the last message -> text after it, with the generation prompt
    drop_bos: str  # the BOS text the chat template starts with, left out because llama.cpp adds BOS itself
    system: bool  # whether the chat template accepts a system message

    def go_template(self) -> str:
        cases = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq $key "{key}" }}}}{text}'
                         for i, (key, text) in enumerate(self.before.items()))
        ends = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq $prev "{role}" }}}}{text}'
                        for i, (role, text) in enumerate(self.after.items()))
        body = ('{{ $prev := "" }}{{ range .Messages }}{{ $key := printf "%s>%s" $prev .Role }}'
                + cases + "{{ end }}{{ .Content }}{{ $prev = .Role }}{{ end }}" + ends + "{{ end }}")
        if "{{" in "".join(self.before.values()) + "".join(self.after.values()) or '"""' in body:
            raise QloraKitError('the chat template writes "{{" or \'"""\', which a Modelfile TEMPLATE cannot hold')
        return body


def split_by_probes(text: str, order: list[str]) -> list[str] | None:
    """The text around each probe in `order`, or None when the template moved or dropped one (content not in place)."""
    pieces, rest = [], text
    for tag in order:
        marker = PROBE.format(tag)
        if rest.count(marker) != 1:
            return None
        head, rest = rest.split(marker)
        pieces.append(head)
    return [*pieces, rest]


def conversation(tags: list[str]) -> list[dict[str, str]]:
    return [{"role": PROBE_ROLES[tag[0]], "content": PROBE.format(tag)} for tag in tags]


def ollama_template(tokenizer, adds_bos: bool) -> OllamaTemplate:
    """Read the pieces off the chat template with probe messages, then prove the Go template renders exactly what
    `apply_chat_template(..., add_generation_prompt=True)` does for several conversations, or raise."""
    from jinja2 import TemplateError

    def render(tags: list[str]) -> str | None:
        try:
            return tokenizer.apply_chat_template(conversation(tags), tokenize=False, add_generation_prompt=True)
        except (TemplateError, ValueError):
            return None

    before: dict[str, str] = {}
    after: dict[str, str] = {}
    bos = tokenizer.bos_token or ""
    for tags in (["S0", "U0", "A0", "U1", "A1", "U2"], ["U0", "A0", "U1", "A1", "U2"], ["U0", "A0"]):
        text = render(tags)
        if text is None:
            continue
        pieces = split_by_probes(text, tags)
        if pieces is None and tags[0] == "S0":
            log.warning("the chat template moves the system prompt away from the start (e.g. into the last user "
                        "turn); the Ollama TEMPLATE has no system message")
            continue
        if pieces is None:
            raise QloraKitError(unsupported_template("it moves a message's content away from its turn"))
        roles = [PROBE_ROLES[t[0]] for t in tags]
        for i, role in enumerate(roles):
            key = f"{roles[i - 1] if i else ''}>{role}"
            before.setdefault(key, pieces[i])
        after.setdefault(roles[-1], pieces[-1])
    if ">user" not in before:
        raise QloraKitError(unsupported_template("it cannot render a user message followed by a generation prompt"))
    drop_bos = ""
    if adds_bos and bos and all(text.startswith(bos) for key, text in before.items() if key.startswith(">")):
        drop_bos = bos
        before = {k: v[len(bos):] if k.startswith(">") else v for k, v in before.items()}
    template = OllamaTemplate(before, after, drop_bos, system=">system" in before)
    for tags in (["U0"], ["S0", "U0"], ["U0", "A0", "U1"], ["S0", "U0", "A0", "U1", "A1", "U2"]):
        expected = render(tags)
        if expected is None or (tags[0] == "S0" and not template.system):
            continue
        messages = conversation(tags)
        got = drop_bos + render_go_template(template.go_template(), messages)
        if got != expected:
            raise QloraKitError(unsupported_template(f"for {[m['role'] for m in messages]} the Go template renders "
                                                     f"{got!r} instead of {expected!r}"))
    return template


def unsupported_template(why: str) -> str:
    return (f"the tokenizer's chat template cannot be written as an Ollama TEMPLATE: {why}; export --format gguf "
            "(the GGUF carries the chat template for llama.cpp) and write the Modelfile TEMPLATE by hand")


GO_ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)


def render_go_template(template: str, messages: list[dict[str, str]]) -> str:
    """Render the subset of Go's text/template that `OllamaTemplate.go_template` writes (variables, printf "%s",
    eq, if / else if / end, range .Messages, .Role / .Content), the way Ollama would; anything else is an error."""
    tokens: list[tuple[str, str]] = []
    last = 0
    for match in GO_ACTION.finditer(template):
        tokens.append(("text", template[last:match.start()]))
        tokens.append(("action", match.group(1).strip()))
        last = match.end()
    tokens.append(("text", template[last:]))
    out: list[str] = []
    variables: dict[str, str] = {}

    def value(expr: str, dot: dict[str, str] | None) -> str:
        expr = expr.strip()
        if expr.startswith('"') and expr.endswith('"'):
            return expr[1:-1]
        if expr.startswith("$"):
            return variables[expr]
        if expr in (".Role", ".Content") and dot is not None:
            return dot[expr[1:].lower()]
        if expr.startswith("printf "):
            fmt, *args = re.findall(r'"[^"]*"|\S+', expr[len("printf "):])
            return fmt[1:-1].replace("%s", "{}").format(*(value(a, dot) for a in args))
        raise ValueError(f"Go template subset: cannot evaluate {expr!r}")

    def condition(expr: str, dot: dict[str, str] | None) -> bool:
        parts = re.findall(r'"[^"]*"|\S+', expr)
        if parts[0] != "eq" or len(parts) != 3:
            raise ValueError(f"Go template subset: cannot test {expr!r}")
        return value(parts[1], dot) == value(parts[2], dot)

    def block(i: int, dot: dict[str, str] | None, emit: bool) -> tuple[int, str]:
        """Run tokens from i until an `end` / `else...` at this level; returns (index of that token, its action)."""
        while i < len(tokens):
            kind, text = tokens[i]
            if kind == "text":
                if emit:
                    out.append(text)
                i += 1
                continue
            if text == "end" or text.startswith("else"):
                return i, text
            if text.startswith("range "):
                if text != "range .Messages":
                    raise ValueError(f"Go template subset: cannot range over {text!r}")
                start = i + 1
                end = skip(start)
                for message in messages if emit else []:
                    block(start, message, True)
                i = end + 1
            elif text.startswith("if "):
                i = if_chain(i, dot, emit)
            elif ":=" in text or " = " in text:
                name, expr = re.split(r"\s*:?=\s*", text, maxsplit=1)
                if emit:
                    variables[name] = value(expr, dot)
                i += 1
            else:
                if emit:
                    out.append(value(text, dot))
                i += 1
        return i, ""

    def skip(i: int) -> int:
        depth = 0
        while True:
            kind, text = tokens[i]
            if kind == "action" and (text.startswith(("if ", "range "))):
                depth += 1
            elif kind == "action" and text == "end":
                if depth == 0:
                    return i
                depth -= 1
            i += 1

    def if_chain(i: int, dot: dict[str, str] | None, emit: bool) -> int:
        taken = False
        action = tokens[i][1]
        i += 1
        while True:
            if action.startswith("if ") or action.startswith("else if "):
                test = action.split(" ", 2)[-1] if action.startswith("else if ") else action[3:]
                run = emit and not taken and condition(test, dot)
            else:  # plain else
                run = emit and not taken
            taken = taken or run
            i, action = block(i, dot, run)
            if action == "end":
                return i + 1
            i += 1

    block(0, None, True)
    return "".join(out)


def write_modelfile(folder: Path, merged: Path, system_prompt: str | None, gguf_name: str = "model.gguf") -> str:
    """The Modelfile next to the GGUF: TEMPLATE from the chat template, a stop for each end-of-turn token, SYSTEM.
    `merged` is any folder with the trained tokenizer (the merged model's, or the adapter's)."""
    from transformers import AutoTokenizer, GenerationConfig

    from qlora_kit.model import end_of_turn_token_ids

    tokenizer = AutoTokenizer.from_pretrained(merged)
    adds_bos = bool(gguf.SpecialVocab(merged).add_special_token.get("bos"))
    template = ollama_template(tokenizer, adds_bos)
    if system_prompt and not template.system:
        raise QloraKitError("data.system_prompt is set but the chat template rejects a system message, so Ollama "
                            "could not use it; export --format gguf instead")
    eos = GenerationConfig.from_pretrained(merged).eos_token_id if (merged / "generation_config.json").is_file() \
        else tokenizer.eos_token_id
    stops = tokenizer.convert_ids_to_tokens(end_of_turn_token_ids(tokenizer, eos))
    lines = ["# Written by qlora-kit. Create the model with: ollama create NAME -f Modelfile", f"FROM ./{gguf_name}",
             f'TEMPLATE """{template.go_template()}"""']
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    text = "\n".join(lines) + "\n"
    (folder / "Modelfile").write_text(text)
    return text


def export_ollama(run_dir: Path, merged: Path, target: Path, quant: str) -> Path:
    """An Ollama folder: model.gguf, its Modelfile and gguf_check.json, written aside and renamed into place."""
    from qlora_kit.rundir import atomic_folder

    system_prompt = read_run_recipe(run_dir).data.system_prompt
    with atomic_folder(target) as partial:
        write_modelfile(partial, merged, system_prompt)  # before the GGUF: a template it cannot express fails fast
        check = write_and_check(merged, partial / "model.gguf", quant)
        write_json(partial / "gguf_check.json", asdict(check))
    log.info("Ollama model written to %s; create it with: ollama create NAME -f %s", target, target / "Modelfile")
    return target
