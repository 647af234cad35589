"""What the GPU scripts share: model shapes, the random-weight checkpoints and chat data they train on, the child
process runner, and qlora-kit's recipe and run-folder readings. The scripts import this module and never each other.

  python scripts/bench_common.py env                                   # versions and device as one JSON line
  python scripts/bench_common.py build-model SHAPE FOLDER TOKENIZER [SEQ]   # a random-weight checkpoint
"""

from __future__ import annotations

import collections
import datetime
import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Real shapes of every family in recipes/, each built with its family's own transformers config class (`config`)
# and the hyper-parameters of its config.json that change a step's cost or its code path (biases, q/k norms, GELU
# MLPs, softcapping, sliding windows, fused projections, tied embeddings). The bench tokenizer has a token per byte, but
# every shape keeps its real vocab_size: the embedding, lm_head and loss cost what they cost on the real model.
# Rope scaling and max positions do not change the cost of a 2048-token step.
LLAMA3_ROPE = {"rope_type": "default", "rope_theta": 500000.0}
SHAPES: dict[str, dict[str, Any]] = {
    "70b": dict(label="Llama-3-70B", config="LlamaConfig", hidden_size=8192, intermediate_size=28672,
                num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                max_position_embeddings=8192, rope_parameters=LLAMA3_ROPE, rms_norm_eps=1e-5,
                tie_word_embeddings=False),
    "8b": dict(label="Llama-3-8B", config="LlamaConfig", hidden_size=4096, intermediate_size=14336,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               max_position_embeddings=8192, rope_parameters=LLAMA3_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "3b": dict(label="Llama-3.2-3B", config="LlamaConfig", hidden_size=3072, intermediate_size=8192,
               num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, vocab_size=128256,
               max_position_embeddings=8192, rope_parameters=LLAMA3_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "1b": dict(label="Llama-3.2-1B", config="LlamaConfig", hidden_size=2048, intermediate_size=8192,
               num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               max_position_embeddings=8192, rope_parameters=LLAMA3_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=True),
    # Qwen2Attention always has q/k/v biases
    "qwen2.5-7b": dict(label="Qwen2.5-7B", config="Qwen2Config", hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                       rms_norm_eps=1e-6, tie_word_embeddings=False),
    # Qwen3Attention: RMSNorm on each head of q and k, no biases
    "qwen3-8b": dict(label="Qwen3-8B", config="Qwen3Config", hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=151936, max_position_embeddings=40960, attention_bias=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rms_norm_eps=1e-6,
                     tie_word_embeddings=False),
    "mistral-7b": dict(label="Mistral-7B-v0.3", config="MistralConfig", hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       vocab_size=32768, max_position_embeddings=32768, sliding_window=None,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rms_norm_eps=1e-5,
                       tie_word_embeddings=False),
    # GELU-tanh MLP, (1 + w) RMSNorms around attention and MLP, logit softcapping, every other layer sliding; eager
    # attention as its recipe says (sdpa has no softcapping, and transformers refuses it for Gemma 2)
    "gemma-2-9b": dict(label="Gemma-2-9B", config="Gemma2Config", attention="eager", hidden_size=3584,
                       intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=256, vocab_size=256000, max_position_embeddings=8192,
                       hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096,
                       attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       rms_norm_eps=1e-6, tie_word_embeddings=True),
    # the text model of Gemma-3-4B (Gemma3TextConfig): q/k norms, 5 sliding layers to 1 global, no softcapping
    "gemma-3-4b": dict(label="Gemma-3-4B (text)", config="Gemma3TextConfig", hidden_size=2560,
                       intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
                       head_dim=256, vocab_size=262208, max_position_embeddings=131072,
                       hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=1024,
                       rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                       rms_norm_eps=1e-6, tie_word_embeddings=True),
    # Phi3 modules: one fused qkv_proj and one fused gate_up_proj per layer, rotary on 3/4 of each head
    "phi-4-mini": dict(label="Phi-4-mini", config="Phi3Config", hidden_size=3072, intermediate_size=8192,
                       num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8, vocab_size=200064,
                       max_position_embeddings=131072, original_max_position_embeddings=4096,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
                       rms_norm_eps=1e-5, tie_word_embeddings=True),
    "smollm2-1.7b": dict(label="SmolLM2-1.7B", config="LlamaConfig", hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
                         max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 130000.0},
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
}
TINY_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=8192, max_position_embeddings=2048)


def tiny_shape(shape: str) -> dict[str, Any]:
    """`shape` at CPU size (the sizes of TINY_SIZES, head_dim 16 where the family sets its own, windows of 64 tokens
    so that a 128-token row crosses them) with everything else of its family kept: class, biases, norms, activation,
    softcapping, tied embeddings, partial rotary."""
    spec = {**SHAPES[shape], **TINY_SIZES, "label": f"tiny {SHAPES[shape]['label']}"}
    if "head_dim" in spec:
        spec["head_dim"] = 16
    if spec.get("query_pre_attn_scalar"):
        spec["query_pre_attn_scalar"] = 16
    if spec.get("sliding_window"):
        spec["sliding_window"] = 64
    if spec["config"] == "Gemma3TextConfig":  # its 5-sliding-to-1-global pattern would leave 2 layers all sliding
        spec["layer_types"] = ["sliding_attention", "full_attention"]
    if SHAPES[shape]["num_key_value_heads"] == SHAPES[shape]["num_attention_heads"]:
        spec["num_key_value_heads"] = spec["num_attention_heads"]  # multi-head attention stays multi-head
    if "original_max_position_embeddings" in spec:
        spec["original_max_position_embeddings"] = spec["max_position_embeddings"]
    return spec


# `tiny` is the Llama; `tiny-FAMILY` runs each other family's code paths on CPU (bench.py --tiny --configs ...)
SHAPES["tiny"] = {**tiny_shape("8b"), "label": "tiny", "tie_word_embeddings": False}
TINY_FAMILIES = {"tiny-qwen2.5": "qwen2.5-7b", "tiny-qwen3": "qwen3-8b", "tiny-mistral": "mistral-7b",
                 "tiny-gemma-2": "gemma-2-9b", "tiny-gemma-3": "gemma-3-4b", "tiny-phi-4-mini": "phi-4-mini",
                 "tiny-smollm2": "smollm2-1.7b"}
SHAPES.update({tiny: tiny_shape(family) for tiny, family in TINY_FAMILIES.items()})

# The seed recipe's settings, shared by both paths.
LORA = dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
LEARNING_RATE, SCHEDULER, WARMUP, SEED = 2e-4, "cosine", 0.03, 42

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
COMMON_WORDS = (  # noqa: SIM905 (a sentence reads better than 150 quoted words)
    "the of and to in a is that for it as was with be by on not he i this are or his from at which but have an they "
    "you were her she there one all we their been has when who will more no if out so said what up its about into "
    "than them can only other new some could time these two may then do first any my now such like our over man me "
    "even most made after also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old year off come since against go "
    "came right used take three user assistant system"
).split()


# --------------------------------------------------------------------------------------------------- tokenizer and data


def vocabulary(size: int = 2000) -> list[str]:
    """Common English words plus pronounceable made-up ones: the rows read like text."""
    rng = random.Random(0)
    onsets = ["b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "br", "cl", "dr", "fr",
              "gr", "pl", "st", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "st", "ng"]
    words = list(dict.fromkeys(COMMON_WORDS))
    seen = set(words)
    while len(words) < size:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(1, 3))) + rng.choice(codas)
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def build_tokenizer(folder: Path):
    """One token per byte: a byte-level BPE with no merges and a ChatML template. Every family's tokenizer class
    rebuilds it unchanged from the model folder (transformers 5 loads a Qwen2 folder's tokenizer as Qwen2Tokenizer,
    which swaps the pre-tokenizer: a word-level vocabulary came out as ~1,830 garbled tokens of a 2,048-token row,
    so the Qwen2.5 rows were padded to the batch's longest and attention ran with a mask)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(SPECIALS + alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return tokenizer


def check_model_tokenizer(model: Path, data: Path) -> None:
    """The model folder's tokenizer, as every path loads it (AutoTokenizer, the family's class), renders the data's
    first row to the same ids as the bench tokenizer: otherwise rows are not the lengths the bench claims."""
    from transformers import AutoTokenizer

    row = json.loads(data.read_text().splitlines()[0])
    messages = row.get("messages") or row["prompt"] + row.get("chosen", [])
    mine = rendered_ids(AutoTokenizer.from_pretrained(data.parent / "tokenizer"), messages)
    theirs = rendered_ids(AutoTokenizer.from_pretrained(model), messages)
    if mine != theirs:
        raise RuntimeError(f"{model.name}'s tokenizer renders the bench row to {len(theirs)} tokens, not "
                           f"{len(mine)}: rows would be padded; fix build_tokenizer before timing anything")


def sentence_words(rng: random.Random, words: list[str], weights: list[float], chars: int) -> str:
    """Sentences of Zipf-distributed words, cut to exactly `chars` characters (one token each)."""
    text = ""
    while len(text) < chars:
        sentence = rng.choices(words, weights, k=rng.randint(6, 24))
        text += (" " if text else "") + sentence[0].capitalize() + " " + " ".join(sentence[1:]) + rng.choice(".....?!")
    return text[:chars]


class ZipfText:
    """Text of Zipf-distributed words, exactly N tokens (characters) each, from one seeded stream: the bench's rows."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.words = vocabulary()
        self.weights = [1.0 / (rank + 10) for rank in range(len(self.words))]

    def __call__(self, tokens: int) -> str:
        return sentence_words(self.rng, self.words, self.weights, tokens)


def rendered_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    """The token ids of `messages` as the bench tokenizer's chat template renders them (what qlora-kit trains on)."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                         return_dict=True)["input_ids"]


def write_dataset(tokenizer, path: Path, seq: int, rows: int, ragged: bool = False) -> dict[str, Any]:
    """Chat rows (user question, long assistant answer) that each render to exactly `seq` tokens; `ragged`: to a
    length drawn uniformly from seq/2..seq each, so batches are padded to their longest row as real data's are."""
    text = ZipfText(1234)
    probe = [{"role": "user", "content": "h"}, {"role": "assistant", "content": "h"}]
    overhead = len(rendered_ids(tokenizer, probe)) - 2
    lengths, wanted = [], []
    with path.open("w") as handle:
        for _ in range(rows):
            wanted.append(text.rng.randint(seq // 2, seq) if ragged else seq)
            user = text.rng.randint(wanted[-1] // 8, wanted[-1] // 4)
            messages = [{"role": "user", "content": text(user)},
                        {"role": "assistant", "content": text(wanted[-1] - overhead - user)}]
            lengths.append(len(rendered_ids(tokenizer, messages)))
            handle.write(json.dumps({"messages": messages}) + "\n")
    if lengths != wanted:
        raise SystemExit(f"dataset rows are {min(lengths)}..{max(lengths)} tokens, not the lengths asked for "
                         f"({min(wanted)}..{max(wanted)}); fix the generator before timing anything")
    return {"path": str(path), "rows": rows, "tokens_per_row": None if ragged else seq, "ragged": ragged}


def chat_data(work: Path, seq: int, rows: int, ragged: bool = False) -> dict[str, Any]:
    """The tokenizer under work/tokenizer and `rows` chat rows of exactly `seq` tokens, or of seq/2..seq with
    `ragged` (see write_dataset)."""
    tokenizer = build_tokenizer(work / "tokenizer")
    name = f"chat_s{seq}_r{rows}{'_ragged' if ragged else ''}.jsonl"
    return write_dataset(tokenizer, work / name, seq, rows, ragged)

def template_overheads(tokenizer) -> tuple[int, int]:
    """(tokens the chat template adds around a user turn plus the generation prompt, tokens it adds to an assistant
    turn), from a one-token probe."""
    user = [{"role": "user", "content": "h"}]
    prompt_ids = rendered_ids(tokenizer, user, generation_prompt=True)
    full_ids = rendered_ids(tokenizer, user + [{"role": "assistant", "content": "h"}])
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise SystemExit("the bench template does not render a prompt as the prefix of its conversation")
    return len(prompt_ids) - 1, len(full_ids) - len(prompt_ids) - 1


def pair_lengths(seq: int) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) tokens of a preference row of `seq` tokens: half prompt, a quarter each answer."""
    prompt, chosen = seq // 2, seq // 4
    return prompt, chosen, seq - prompt - chosen


def preference_data(work: Path, seq: int, rows: int) -> dict[str, Any]:
    """Preference rows (prompt, chosen, rejected as chat turns) whose prompt + chosen + rejected is exactly `seq`
    tokens as rendered by the bench tokenizer (pair_lengths splits them); each row's forward pass processes
    prompt + chosen and prompt + rejected, `tokens_per_pair` tokens."""
    tokenizer = build_tokenizer(work / "tokenizer")
    prompt_len, chosen_len, rejected_len = pair_lengths(seq)
    prompt_extra, answer_extra = template_overheads(tokenizer)
    if min(prompt_len - prompt_extra, chosen_len - answer_extra, rejected_len - answer_extra) < 1:
        raise SystemExit(f"--seq {seq} is too short for a preference row (prompt and answers need content)")
    text = ZipfText(4321)
    path = work / f"pairs_s{seq}_r{rows}.jsonl"
    seen = set()
    with path.open("w") as handle:
        for _ in range(rows):
            prompt = [{"role": "user", "content": text(prompt_len - prompt_extra)}]
            chosen = [{"role": "assistant", "content": text(chosen_len - answer_extra)}]
            rejected = [{"role": "assistant", "content": text(rejected_len - answer_extra)}]
            prompt_ids = rendered_ids(tokenizer, prompt, generation_prompt=True)
            for answer, want in ((chosen, chosen_len), (rejected, rejected_len)):
                full = rendered_ids(tokenizer, prompt + answer)
                seen.add((len(prompt_ids), len(full) - len(prompt_ids), want))
            handle.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    if {(p, a) for p, a, _ in seen} != {(prompt_len, want) for _, _, want in seen}:
        raise SystemExit(f"preference rows render to (prompt, answer) lengths {sorted(seen)}; want prompt "
                         f"{prompt_len}, answers {chosen_len} / {rejected_len}: fix the generator before timing")
    return {"path": str(path), "rows": rows, "tokens_per_row": seq, "prompt_tokens": prompt_len,
            "chosen_tokens": chosen_len, "rejected_tokens": rejected_len,
            "tokens_per_pair": 2 * prompt_len + chosen_len + rejected_len}


def prompt_data(work: Path, prompt_tokens: int, rows: int) -> dict[str, Any]:
    """GRPO rows: one user turn each, exactly `prompt_tokens` tokens with the template and generation prompt."""
    tokenizer = build_tokenizer(work / "tokenizer")
    prompt_extra, _ = template_overheads(tokenizer)
    if prompt_tokens - prompt_extra < 1:
        raise SystemExit(f"a prompt of {prompt_tokens} tokens leaves no room for its content")
    text = ZipfText(2468)
    path = work / f"prompts_p{prompt_tokens}_r{rows}.jsonl"
    lengths = set()
    with path.open("w") as handle:
        for _ in range(rows):
            prompt = [{"role": "user", "content": text(prompt_tokens - prompt_extra)}]
            lengths.add(len(rendered_ids(tokenizer, prompt, generation_prompt=True)))
            handle.write(json.dumps({"prompt": prompt}) + "\n")
    if lengths != {prompt_tokens}:
        raise SystemExit(f"prompts render to {sorted(lengths)} tokens, want exactly {prompt_tokens}")
    return {"path": str(path), "rows": rows, "prompt_tokens": prompt_tokens}


def completion_chars(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """The GRPO bench's reward, on both paths (qlora-kit loads it as `scripts/bench_common.py:completion_chars`):
    characters in each completion (a chat completion's last turn), which differ between samples."""
    return [float(len(c[-1]["content"] if isinstance(c, list) else c)) for c in completions]


# ------------------------------------------------------------------------------------------------- random-weight models


def shape_config(shape: str, tokenizer=None, seq: int = 0, **overrides: Any):
    """(the family's config of `shape` with the tokenizer's special ids, those ids); `overrides` replace
    hyper-parameters (tests: the tokenizer's own vocab_size). A Llama shape given rows longer than its positions gets
    positions for `seq`, RoPE-scaled the way Llama 3.1 scales them (a long-context probe)."""
    import transformers

    spec = {k: v for k, v in SHAPES[shape].items() if k not in ("label", "config", "attention")}
    spec.update(overrides)
    ids = {} if tokenizer is None else dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id)
    config = getattr(transformers, SHAPES[shape]["config"])(**spec, **ids, initializer_range=0.02)
    original = config.max_position_embeddings
    if seq > original:
        if SHAPES[shape]["config"] != "LlamaConfig":
            raise SystemExit(f"--seq {seq}: longer than {shape}'s {original} positions; the RoPE-scaled long-context "
                             "probe is built for Llama shapes only")
        factor = -(-seq // original)
        config.max_position_embeddings = factor * original
        config.rope_parameters = {"rope_type": "llama3", "rope_theta": spec["rope_parameters"]["rope_theta"],
                                  "factor": float(factor), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": original}
    return config, ids


def cmd_build_model(shape: str, folder: str, tokenizer_folder: str, seq: str = "0") -> None:
    """Random bf16 model of `shape`, built on the GPU (CPU in fp32 without one), saved with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config, ids = shape_config(shape, tokenizer, int(seq))
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if cuda:
        torch.cuda.synchronize()
    built = time.perf_counter()
    model.generation_config = GenerationConfig(**ids)
    partial = Path(folder + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, folder)
    os.sync()  # the checkpoint's dirty pages are written now, not by kernel threads during the first timed run
    saved = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    print("BENCH_JSON " + json.dumps({"parameters": params, "build_s": round(built - start, 1),
                                      "save_s": round(saved - built, 1)}))


def write_sparse_safetensors(path: Path, tensors: dict[str, tuple[list[int], Any]]) -> int:
    """A bf16 safetensors file; tensors given as None are left as holes (zeros that take no disk)."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, _) in tensors.items():
        size = 2 * int(math.prod(shape))
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        start = handle.tell()
        for name, (_, value) in tensors.items():
            if value is not None:
                handle.seek(start + header[name]["data_offsets"][0])
                handle.write(value.contiguous().view(torch.int16).numpy().tobytes())
        handle.truncate(start + offset)
    return offset


def build_sparse_model(shape: str, folder: Path, tokenizer_folder: Path) -> dict[str, Any]:
    """The shape's checkpoint with hole-filled decoder linears (see the module docstring): the tensor names and
    shapes come from the family's model class built on the meta device, so every family's layout (fused qkv_proj,
    q/k/v biases, q/k norms, Gemma's extra norms, tied embeddings) is written as transformers will read it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if (folder / "config.json").is_file():
        return {"reused": True}
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config, ids = shape_config(shape, tokenizer)
    config.dtype = "bfloat16"
    with torch.device("meta"):
        layout = AutoModelForCausalLM.from_config(config)
    # (1 + w) norms (Gemma) are the identity at w = 0, the others at w = 1; biases are zero
    norm_one = 0.0 if config.model_type.startswith("gemma") else 1.0
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)

    def random(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    shards: list[dict[str, tuple[list[int], Any]]] = [{}]
    saved = dict(layout.state_dict())
    if config.tie_word_embeddings:
        saved.pop("lm_head.weight", None)  # save_pretrained writes tied weights once
    last_layer = None
    for name, tensor in saved.items():
        dims = list(tensor.shape)
        layer = int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None
        if layer is not None and layer != last_layer and layer % 8 == 0:
            shards.append({})  # eight decoder layers a shard
        last_layer = layer
        if len(dims) == 2:  # decoder linears are holes; embeddings and lm_head random
            value = None if layer is not None else random(*dims)
        else:  # norms are the identity; biases zero (holes)
            value = torch.full(dims, norm_one, dtype=torch.bfloat16) if "norm" in name else None
        shards[-1][name] = (dims, value)
    weight_map, total = {}, 0
    for number, tensors in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        total += write_sparse_safetensors(folder / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    GenerationConfig(**ids).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config.save_pretrained(folder)
    parameters = total // 2
    return {"parameters": parameters, "checkpoint_gib_logical": round(total / 2**30, 1), "sparse": True,
            "build_s": round(time.perf_counter() - start, 1)}


# --------------------------------------------------------------------------------------------------------- subprocesses


def cmd_env() -> None:
    """Versions and device, printed as one JSON line."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    info: dict[str, Any] = {"date": datetime.date.today().isoformat(), "python": sys.version.split()[0]}
    for name in ("torch", "transformers", "bitsandbytes", "peft", "trl", "accelerate", "datasets", "tokenizers",
                 "liger-kernel"):
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = "not installed"
    info["cuda"] = torch.version.cuda
    # qlora-kit's step is short enough that the host CPU's kernel-launch rate shows in tokens/s: record the host
    cpu = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
           if line.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
    info["cpu"] = f"{cpu[0]} x{len(cpu)}" if cpu else "unknown"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = "unknown"
    else:
        info["gpu"] = "none (CPU)"
    print("BENCH_JSON " + json.dumps(info))


def run_logged(command: list[str], timeout: float, log_name: str, env: dict[str, str] | None = None
               ) -> tuple[int | str, dict[str, Any], list[str], float]:
    """Run a child in its own process group, echo its output, and return (status, its BENCH_JSON, tail, seconds).
    `env`: the child's whole environment (default: this process's)."""
    print(f"\n=== {log_name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    result: dict[str, Any] = {}
    quiet = {"PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    # Own process group (not session): a timeout kills the child's whole tree, and the caller's kill still reaches it.
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               bufsize=1, process_group=0, env={**(os.environ if env is None else env), **quiet})
    deadline = start + timeout
    status: int | str
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("BENCH_JSON "):
                result = json.loads(line.removeprefix("BENCH_JSON "))
                continue
            sys.stdout.write(line)
            tail.append(line.rstrip("\n"))
            if time.perf_counter() > deadline:
                raise subprocess.TimeoutExpired(command, timeout)
        status = process.wait(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        status = f"timeout after {timeout:.0f} s"
    sys.stdout.flush()
    return status, result, list(tail), time.perf_counter() - start


def error_summary(status: int | str, tail: list[str]) -> str:
    """The line that says what went wrong (OOM, exception), else the exit status."""
    for line in reversed(tail):
        if any(key in line for key in ("OutOfMemoryError", "out of memory", "Error", "error:")):
            return f"exit {status}: {line.strip()[:300]}"
    return f"exit {status}"


def code_version() -> dict[str, Any]:
    """The qlora-kit commit measured, and whether its package had uncommitted changes (None where git is absent)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "qlora_kit"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "qlora_kit_changes": None}
    if commit.returncode != 0:
        return {"commit": None, "qlora_kit_changes": None}
    return {"commit": commit.stdout.strip(), "qlora_kit_changes": dirty.stdout.split("\n")[:-1]}



def read_environment() -> dict[str, Any]:
    """`cmd_env` in a child process (this process never initialises CUDA), with `gpu` False on a CPU machine."""
    status, env, tail, _ = run_logged([sys.executable, __file__, "env"], 120, "environment")
    if status != 0:
        raise SystemExit(f"could not read the environment: {error_summary(status, tail)}")
    return {**env, "has_gpu": env.get("gpu") != "none (CPU)"}

# ------------------------------------------------------------------------------------------------------- qlora-kit runs


def ensure_model(shape: str, work: Path, timeout: float, seq: int = 0) -> tuple[Path, dict[str, Any]]:
    """The shape's random checkpoint under work/models (built once); rows longer than the shape's positions get a
    Llama-3.1-style RoPE-scaled copy (same cost per token: scaling only changes the rotary frequencies)."""
    long = seq > SHAPES[shape]["max_position_embeddings"]
    if shape == "70b" and not long:  # 140 GB of bf16 does not fit the disk: decoder linears become sparse holes
        folder = work / "models" / "70b_sparse"
        return folder, build_sparse_model(shape, folder, work / "tokenizer")
    folder = work / "models" / (f"{shape}_pos{seq}" if long else shape)
    if (folder / "config.json").is_file():
        return folder, {"reused": True}
    folder.parent.mkdir(parents=True, exist_ok=True)
    status, result, tail, seconds = run_logged(
        [sys.executable, __file__, "build-model", shape, str(folder), str(work / "tokenizer"), str(seq)], timeout,
        f"build {shape}")
    if status != 0:
        raise RuntimeError(f"building the {shape} model failed: {error_summary(status, tail)}")
    return folder, {**result, "wall_s": round(seconds, 1)}


def qlora_kit_recipe(model: Path, data: Path, work: Path, shape: str, seq: int, batch: int, steps: int,
                     gpu: bool) -> dict[str, Any]:
    """The seed settings as a qlora-kit recipe."""
    return {
        "model": {"name": str(model), "attn_implementation": attention(shape)},
        "quantization": {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True,
                         "compute_dtype": "bf16" if gpu else "fp32"},
        "lora": dict(LORA),
        "data": {"datasets": [{"path": str(data)}], "loss_on": "all"},
        "training": {"output_dir": str(work / "runs"), "run_name": f"{shape}_s{seq}_b{batch}", "max_length": seq,
                     "batch_size": batch, "max_steps": steps, "learning_rate": LEARNING_RATE,
                     "lr_scheduler": SCHEDULER, "warmup": WARMUP, "seed": SEED,
                     "optimizer": "paged_adamw_8bit" if gpu else "adamw_torch", "gradient_checkpointing": True,
                     "logging_steps": 1, "save_steps": max(200, steps + 1), "overwrite": True},
        "evaluation": {"metric": "none"},
        "export": {"merge": False},
        # every layer checkpointed, as on the plain path; `speed.keep_activations_layers=auto` (qlora-kit's default)
        # spends the GPU's free memory on skipping recomputes instead
        "speed": {"keep_activations_layers": 0},
    }


def attention(shape: str) -> str:
    """The attention implementation both paths run a shape with: its family recipe's (sdpa unless it says)."""
    return SHAPES[shape].get("attention", "sdpa")


def run_measurements(run_dir: Path) -> dict[str, Any]:
    """What a finished qlora-kit run folder says about speed, memory and loss (summary.json, metrics.jsonl)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"tokens_per_second": summary.get("train_tokens_per_second"),
            "seconds_per_step": summary.get("seconds_per_step"), "measured_steps": summary.get("measured_steps"),
            "peak_gpu_memory_gib": summary.get("peak_gpu_memory_gib"),
            "peak_reserved_gib": summary.get("peak_reserved_gpu_memory_gib"),
            "kept_activation_layers": summary.get("kept_activation_layers"),
            "step_seconds": summary.get("step_seconds"), "losses": [m["loss"] for m in metrics if "loss" in m],
            "first_step_s": summary.get("first_step_seconds"), "model_load_s": summary.get("model_load_seconds")}


def fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


# ----------------------------------------------------------------------------------------------- single kernels


def projection_shapes(shape: str = "8b") -> dict[str, tuple[int, int]]:
    """(out, in) of each decoder projection of a shape, the weights the fused LoRA layers dequantize (Phi3's fused
    qkv_proj and gate_up_proj as they are; q_proj and o_proj named together where both are square)."""
    spec = SHAPES[shape]
    hidden, inner = spec["hidden_size"], spec["intermediate_size"]
    head_dim = spec.get("head_dim") or hidden // spec["num_attention_heads"]
    q, kv = spec["num_attention_heads"] * head_dim, spec["num_key_value_heads"] * head_dim
    if spec["config"] == "Phi3Config":
        return {"qkv_proj": (q + 2 * kv, hidden), "o_proj": (hidden, q), "gate_up_proj": (2 * inner, hidden),
                "down_proj": (hidden, inner)}
    attention = {"q_proj/o_proj": (hidden, hidden)} if q == hidden else {"q_proj": (q, hidden), "o_proj": (hidden, q)}
    return {**attention, "k_proj/v_proj": (kv, hidden), "gate_proj/up_proj": (inner, hidden),
            "down_proj": (hidden, inner)}


def gpu_ms(step, repeats: int = 10) -> float:
    """Milliseconds per call of `step` between CUDA events around back-to-back calls, after two warm-up calls."""
    import torch

    for _ in range(2):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


if __name__ == "__main__":
    if sys.argv[1:2] == ["env"]:
        cmd_env()
    elif sys.argv[1:2] == ["build-model"]:
        cmd_build_model(*sys.argv[2:6])
    else:
        raise SystemExit(__doc__)
