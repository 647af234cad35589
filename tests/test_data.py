"""Data: rows become checked conversations, and the loss mask covers exactly the assistant replies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from qlora_kit.data import (
    DataError,
    PreparedData,
    build_datasets,
    load_conversations,
    render,
    split_validation,
    tokenize_conversation,
)
from qlora_kit.recipe import DatasetSource, RecipeError, load_recipe

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "Shout the words apple river."},
    {"role": "assistant", "content": "APPLE RIVER"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def runs(ids: list[int], mask: list[int], tokenizer, trained: int) -> list[str]:
    """Decoded text of each maximal run of tokens whose mask bit equals `trained`."""
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


# ---------------------------------------------------------------------------------------------------- masking


def test_mask_covers_exactly_each_assistant_reply_and_its_end_of_turn(tiny_tokenizer):
    tokenized = tokenize_conversation(tiny_tokenizer, CONVERSATION, loss_on="completion")
    ids, mask = tokenized["input_ids"], tokenized["assistant_masks"]

    # The template closes every turn with "<|im_end|>\n"; both are trained, so the model learns to stop.
    assert runs(ids, mask, tiny_tokenizer, trained=1) == [
        "Paris is the capital of France.<|im_end|>\n",
        "APPLE RIVER<|im_end|>\n",
    ]
    # Everything else (system, user, and the assistant headers) is masked, token by token.
    assert runs(ids, mask, tiny_tokenizer, trained=0) == [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nShout the words apple river.<|im_end|>\n<|im_start|>assistant\n",
    ]


def test_tokenized_conversation_is_the_rendered_template_unchanged(tiny_tokenizer):
    tokenized = tokenize_conversation(tiny_tokenizer, CONVERSATION, loss_on="completion")

    rendered = render(tiny_tokenizer, CONVERSATION)
    assert tokenized["input_ids"] == tiny_tokenizer(rendered, add_special_tokens=False).input_ids
    assert len(tokenized["assistant_masks"]) == len(tokenized["input_ids"])


def test_every_token_of_system_and_user_turns_is_masked(tiny_tokenizer):
    tokenized = tokenize_conversation(tiny_tokenizer, CONVERSATION, loss_on="completion")
    text = render(tiny_tokenizer, CONVERSATION)
    offsets = tiny_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping

    for turn in CONVERSATION:
        if turn["role"] == "assistant":
            continue
        start = text.index(turn["content"])
        end = start + len(turn["content"])
        inside = [bit for (s, e), bit in zip(offsets, tokenized["assistant_masks"], strict=True)
                  if s < end and e > start]
        assert inside and not any(inside), f"{turn['role']} tokens are trained on"


def test_loss_on_all_trains_every_token(tiny_tokenizer):
    tokenized = tokenize_conversation(tiny_tokenizer, CONVERSATION, loss_on="all")

    assert tokenized["assistant_masks"] == [1] * len(tokenized["input_ids"])


def test_template_without_end_of_turn_token_gets_eos_appended_and_trained(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ':\n' + m['content'] + '\n' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}")
    conversation = [{"role": "user", "content": "Shout the words apple river."},
                    {"role": "assistant", "content": "APPLE RIVER"}]

    tokenized = tokenize_conversation(tokenizer, conversation, loss_on="completion")

    ids, mask = tokenized["input_ids"], tokenized["assistant_masks"]
    assert ids[-1] == tokenizer.eos_token_id
    assert runs(ids, mask, tokenizer, trained=1) == ["APPLE RIVER\n<|im_end|>"]


# ------------------------------------------------------------------------------------------------ row layouts


def test_prompt_completion_rows_become_user_and_assistant_turns(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Shout apple.", "completion": "APPLE"}])

    assert load_conversations(DatasetSource(path=str(path)), system_prompt=None) == [
        [{"role": "user", "content": "Shout apple."}, {"role": "assistant", "content": "APPLE"}]]


@pytest.mark.parametrize("name", ["pairs.jsonl.gz", "pairs.json.bz2", "pairs.csv.xz", "pairs.csv.gz"])
def test_compressed_text_files_read_the_rows_of_the_file_inside(tmp_path, name):
    """.jsonl / .json / .csv compressed whole (gzip, bz2, xz) read as the file inside would, alone or in a folder."""
    import bz2
    import gzip
    import lzma

    rows = [{"prompt": "Shout apple.", "completion": "APPLE"}, {"prompt": "Shout pear.", "completion": "PEAR"}]
    kind, compression = name.split(".")[1:]
    text = {"jsonl": "\n".join(json.dumps(r) for r in rows), "json": json.dumps(rows),
            "csv": "prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in rows)}[kind]
    pack = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[compression]
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / name
    path.write_bytes(pack(text.encode()))
    want = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
            for r in rows]
    assert load_conversations(DatasetSource(path=str(path)), system_prompt=None) == want
    assert load_conversations(DatasetSource(path=str(folder)), system_prompt=None) == want


def test_system_prompt_is_added_only_to_conversations_without_one(tmp_path):
    own_system = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Thanks"},
                  {"role": "assistant", "content": "Merci"}]
    no_system = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": own_system}, {"messages": no_system}])

    conversations = load_conversations(DatasetSource(path=str(path)), system_prompt="Be brief.")

    assert conversations[0] == own_system
    assert conversations[1] == [{"role": "system", "content": "Be brief."}, *no_system]


def test_system_prompt_is_added_to_prompt_completion_rows(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Shout apple.", "completion": "APPLE"}])

    [conversation] = load_conversations(DatasetSource(path=str(path)), system_prompt="Be brief.")

    assert [turn["role"] for turn in conversation] == ["system", "user", "assistant"]
    assert conversation[0]["content"] == "Be brief."


# -------------------------------------------------------------------------------------------------- bad rows

GOOD = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}


def data_error(path: Path) -> str:
    with pytest.raises(DataError) as caught:
        load_conversations(DatasetSource(path=str(path)), system_prompt=None)
    return str(caught.value)


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"messages": [{"role": "user", "content": "broken"\n')

    assert f"{path}: line 3: invalid JSON" in data_error(path)


def test_missing_field_names_the_field_and_the_row_columns(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, {"prompt": "no messages here"}])

    message = data_error(path)

    assert f"{path}: line 2: missing field 'messages'" in message
    assert "['prompt']" in message


def test_unknown_role_is_named_with_the_valid_roles(tmp_path):
    row = {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "boop"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, row])

    message = data_error(path)

    assert f"{path}: line 2: turn 0: unknown role 'robot'" in message
    assert "system, user, assistant" in message


def test_conversation_ending_on_a_user_turn_is_refused(tmp_path):
    row = {"messages": [{"role": "user", "content": "Only a question?"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [row])

    assert f"{path}: line 1: the conversation ends on a user turn; it must end on an assistant turn" in data_error(path)


def test_empty_content_is_refused(tmp_path):
    row = {"messages": [{"role": "user", "content": "Empty answer"}, {"role": "assistant", "content": "  "}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, GOOD, row])

    assert f"{path}: line 3: turn 1 (assistant): content is empty or not a string" in data_error(path)


def test_row_that_is_not_an_object_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, ["user", "hi"]])

    assert f"{path}: line 2: a row must be a JSON object, got list" in data_error(path)


# ------------------------------------------------------------------------------------------------- splitting


@pytest.mark.parametrize(("validation", "held_out"), [("0.25", 10), ("5", 5)])
def test_validation_split_is_deterministic_and_disjoint_from_train(make_recipe, validation, held_out):
    recipe = load_recipe(make_recipe(), [f"data.validation={validation}"])
    rows = [f"row {i}" for i in range(40)]

    train, held = split_validation(rows, recipe)

    assert len(held) == held_out
    assert len(train) == 40 - held_out
    assert set(train).isdisjoint(held)
    assert sorted(train + held) == sorted(rows)
    assert split_validation(rows, recipe) == (train, held)  # same seed, same split
    other_seed = load_recipe(make_recipe(), [f"data.validation={validation}", "data.seed=7"])
    assert split_validation(rows, other_seed)[1] != held


def test_validation_count_that_leaves_no_training_rows_is_refused(make_recipe):
    recipe = load_recipe(make_recipe(), ["data.validation=40"])

    with pytest.raises(DataError, match="data.validation: 40 leaves no training rows out of 40"):
        split_validation([f"row {i}" for i in range(40)], recipe)


def test_held_out_rows_are_read_from_a_file_a_folder_or_a_glob_as_training_paths_are(make_recipe, shout_files,
                                                                                      tmp_path):
    """data.validation takes what data.datasets' paths take; a path that names nothing is refused with the folder
    relative paths are read from."""
    folder = tmp_path / "held_out"
    folder.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (folder / name).write_text(shout_files[0].read_text())
    for held_out, rows in ((folder / "a.jsonl", 20), (folder, 40), (folder / "*.jsonl", 40)):
        recipe = load_recipe(make_recipe(data={"validation": str(held_out)}))
        train, held = split_validation([f"row {i}" for i in range(20)], recipe)
        assert len(train) == 20 and len(held) == rows
    with pytest.raises(RecipeError, match=r"data.validation: file not found: nothere.jsonl \(relative paths are read "
                                          r"from the current folder"):
        load_recipe(make_recipe(data={"validation": "nothere.jsonl"}))


def test_build_datasets_tokenizes_train_and_held_out_rows(make_recipe, tiny_tokenizer):
    recipe = load_recipe(make_recipe(), ["data.validation=8", "data.cache=false"])

    data = build_datasets(recipe, tiny_tokenizer)

    assert isinstance(data, PreparedData)
    assert len(data.train) == 32
    assert len(data.eval) == 8
    assert len(data.eval_conversations) == 8
    assert all(c[-1]["role"] == "assistant" for c in data.eval_conversations)
    train_texts = {tiny_tokenizer.decode(row["input_ids"]) for row in data.train}
    held_texts = {tiny_tokenizer.decode(row["input_ids"]) for row in data.eval}
    assert train_texts.isdisjoint(held_texts)


# -------------------------------------------------------------------------------------------- trl's labels


def test_sft_trainer_labels_are_input_ids_where_masked_in_and_minus_100_elsewhere(make_recipe, tiny_tokenizer,
                                                                                  tiny_model_dir, tmp_path):
    from qlora_kit.model import build_quantized_model
    from qlora_kit.speed import Machine, decide_speed_plan
    from qlora_kit.trainers import build_trainer

    recipe = load_recipe(make_recipe(), ["data.cache=false"])
    data = build_datasets(recipe, tiny_tokenizer)
    model = build_quantized_model(recipe, str(tiny_model_dir), torch.float32)
    plan = decide_speed_plan(recipe, model.config, Machine.measure(), model.get_nb_trainable_parameters()[0])

    trainer = build_trainer(recipe, model, tiny_tokenizer, data, tmp_path / "run", torch.float32, plan)

    assert len(trainer.train_dataset) == len(data.train) == 40
    for ours, theirs in zip(data.train, trainer.train_dataset, strict=True):
        assert theirs["input_ids"] == ours["input_ids"]
        expected = [token if bit else -100 for token, bit in zip(ours["input_ids"], ours["assistant_masks"],
                                                                 strict=True)]
        assert theirs["labels"] == expected
    first = trainer.train_dataset[0]  # "Shout the words apple river." -> "APPLE RIVER"
    assert tiny_tokenizer.decode([t for t in first["labels"] if t != -100]) == "APPLE RIVER<|im_end|>\n"


def test_batches_of_many_lengths_are_named_so_the_attention_kernel_can_avoid_per_shape_plans(make_recipe,
                                                                                             tiny_tokenizer):
    """data.varying_batch_lengths says why training batches take many sequence lengths (rows of different lengths
    padded to each batch's longest, packing) and None where every batch has one shape (every row as long as
    training.max_length after truncation): the speed plan keeps cuDNN's attention, which builds a plan per shape,
    only then."""
    from qlora_kit.data import varying_batch_lengths

    recipe = load_recipe(make_recipe(), ["data.cache=false"])
    data = build_datasets(recipe, tiny_tokenizer)
    lengths = data.stats["train"]["lengths"]
    assert lengths[0] < lengths[-1] <= 64  # the shout rows differ in length, none is truncated
    assert varying_batch_lengths(data, recipe) == (f"rows of {lengths[0]:,} to {lengths[-1]:,} tokens, each batch "
                                                   "padded to its longest")

    shortest = load_recipe(make_recipe(), ["data.cache=false", f"training.max_length={lengths[0]}",
                                           "data.overlong=truncate"])
    assert varying_batch_lengths(build_datasets(shortest, tiny_tokenizer), shortest) is None

    packed = load_recipe(make_recipe(), ["data.cache=false", "training.packing=true"])
    assert "without padding" in varying_batch_lengths(build_datasets(packed, tiny_tokenizer), packed)

    padded = load_recipe(make_recipe(), ["data.cache=false", "training.pad_to_max_length=true"])
    assert varying_batch_lengths(build_datasets(padded, tiny_tokenizer), padded) is None


def test_pad_to_max_length_gives_every_batch_max_length_tokens_with_the_padding_out_of_the_loss(
        make_recipe, tiny_tokenizer, tiny_model_dir, tmp_path):
    """training.pad_to_max_length: rows of many lengths come out of trl's collator max_length long, the padding
    labelled -100 (no loss) and masked out; the memory estimates size batches to max_length."""
    from qlora_kit.data import longest_training_row
    from qlora_kit.model import build_quantized_model
    from qlora_kit.speed import Machine, decide_speed_plan
    from qlora_kit.trainers import build_trainer

    recipe = load_recipe(make_recipe(), ["data.cache=false", "training.pad_to_max_length=true",
                                         "training.max_length=80"])
    data = build_datasets(recipe, tiny_tokenizer)
    assert data.stats["train"]["lengths"][-1] < 80 and longest_training_row(data, recipe) == 80
    model = build_quantized_model(recipe, str(tiny_model_dir), torch.float32)
    plan = decide_speed_plan(recipe, model.config, Machine.measure(), model.get_nb_trainable_parameters()[0])
    trainer = build_trainer(recipe, model, tiny_tokenizer, data, tmp_path / "run", torch.float32, plan)
    batches = list(trainer.get_train_dataloader())
    assert len(batches) > 2 and all(b["input_ids"].shape[1] == 80 for b in batches)
    for batch in batches:
        padding = batch["attention_mask"] == 0
        assert padding.any() and (batch["labels"][padding] == -100).all()
    unpadded = load_recipe(make_recipe(), ["data.cache=false", "training.max_length=80"])
    trainer = build_trainer(unpadded, model, tiny_tokenizer, build_datasets(unpadded, tiny_tokenizer),
                            tmp_path / "run2", torch.float32, plan)
    assert {b["input_ids"].shape[1] for b in trainer.get_train_dataloader()} != {80}  # each batch's longest
