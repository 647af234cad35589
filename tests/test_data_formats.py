"""The data layer as a user meets it: every row format, sources, templates and masks, length policy, bad rows, cache."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from datasets import Dataset

from qlora_kit.data import (
    CHAT_TEMPLATES,
    DataError,
    build_datasets,
    load_rows,
    tokenize_conversation,
    tokenize_row,
)
from qlora_kit.recipe import CHAT_TEMPLATE_NAMES, DatasetSource, RecipeError, load_recipe

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def rows_of(path: Path | str, **source) -> list[dict]:
    return load_rows(DatasetSource(path=str(path), **source), system_prompt=None)


# ---------------------------------------------------------------------------------------------- formats


def test_alpaca_rows_become_user_and_assistant_turns_with_input_appended():
    rows = rows_of(FIXTURES / "alpaca.jsonl")
    assert rows[0]["messages"] == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                                   {"role": "assistant", "content": "5"}]
    assert rows[1]["messages"][0]["content"] == "Name a primary colour."  # empty input adds nothing


def test_sharegpt_roles_are_mapped_and_system_kept():
    (row,) = rows_of(FIXTURES / "sharegpt.json")
    assert [t["role"] for t in row["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert row["messages"][-1]["content"] == "Madrid."


def test_sharegpt_custom_role_names_come_from_the_recipe(tmp_path):
    path = tmp_path / "bot.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": "person", "value": "hi"},
                                                  {"from": "bot", "value": "hello"}]}) + "\n")
    with pytest.raises(DataError, match=r"line 1: turn 0: unknown role 'person'; map it with `roles"):
        rows_of(path)
    (row,) = rows_of(path, roles={"person": "user", "bot": "assistant"})
    assert row["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_openai_text_parts_read_as_their_text_and_other_parts_are_refused(tmp_path):
    """OpenAI's chat and fine-tuning files may give a turn's content as a list of parts: text parts are joined as
    OpenAI joins them; an image part is named in the message, not dropped silently."""
    path = tmp_path / "parts.jsonl"
    parts = [{"type": "text", "text": "Capital of "}, {"type": "text", "text": "Spain?"}]
    path.write_text(json.dumps({"messages": [{"role": "user", "content": parts},
                                             {"role": "assistant", "content": [{"type": "text", "text": "Madrid."}]}]})
                    + "\n")
    (row,) = rows_of(path)
    assert row["messages"] == [{"role": "user", "content": "Capital of Spain?"},
                               {"role": "assistant", "content": "Madrid."}]

    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    path.write_text(json.dumps({"messages": [{"role": "user", "content": [image, parts[0]]},
                                             {"role": "assistant", "content": "Madrid."}]}) + "\n")
    with pytest.raises(DataError, match=r"line 1: turn 0 \(user\): content part \{'type': 'image_url'.* is not a "
                                        r"text part .*only text parts can be read"):
        rows_of(path)


def test_csv_columns_are_mapped_to_prompt_and_completion_by_fields():
    rows = rows_of(FIXTURES / "qa.csv", format="prompt_completion",
                   fields={"prompt": "question", "completion": "answer"})
    assert rows[1]["messages"] == [{"role": "user", "content": "Opposite of hot?"},
                                   {"role": "assistant", "content": "cold"}]


def test_a_wrong_field_name_lists_the_columns_the_file_has():
    with pytest.raises(DataError) as error:
        rows_of(FIXTURES / "qa.csv", format="prompt_completion", fields={"prompt": "questoin", "completion": "answer"})
    message = str(error.value)
    assert "qa.csv: row 1: missing field 'questoin'" in message
    assert "['answer', 'question']" in message


def test_conversational_prompt_completion_keeps_its_turns():
    (row,) = rows_of(FIXTURES / "conversational_pc.jsonl")
    assert [t["role"] for t in row["messages"]] == ["system", "user", "assistant"]


def test_text_rows_are_trained_on_every_token_and_end_with_eos(tiny_tokenizer):
    (first, _) = rows_of(FIXTURES / "text.jsonl")
    tokenized = tokenize_row(tiny_tokenizer, first, loss_on="completion")
    assert tokenized["input_ids"][-1] == tiny_tokenizer.eos_token_id
    assert all(tokenized["assistant_masks"])
    assert "The river runs to the sea." in tiny_tokenizer.decode(tokenized["input_ids"])


def test_parquet_files_folders_and_globs_are_read(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    Dataset.from_list([{"text": f"row {i}"} for i in range(3)]).to_parquet(str(folder / "a.parquet"))
    Dataset.from_list([{"text": f"row {i}"} for i in range(3, 5)]).to_parquet(str(folder / "b.parquet"))
    assert [r["text"] for r in rows_of(folder)] == [f"row {i}" for i in range(5)]
    assert len(rows_of(str(folder / "b.*"))) == 2


def test_hub_dataset_offline_fails_with_a_message_that_says_what_to_do():
    with pytest.raises(DataError, match=r"hub dataset 'someone/no-such-set' could not be loaded .* Offline\?"):
        load_rows(DatasetSource(hub="someone/no-such-set"), system_prompt=None)


def test_weighted_sources_repeat_or_subsample_rows(make_recipe, shout_files, tiny_tokenizer):
    recipe = load_recipe(make_recipe(data={"datasets": [{"path": str(shout_files[0]), "weight": 2.0},
                                                        {"path": str(shout_files[1]), "weight": 0.5}],
                                           "cache": False}))
    data = build_datasets(recipe, tiny_tokenizer)
    assert len(data.train) == 20 * 2 + 10


def test_system_prompt_is_added_only_where_missing():
    with_system = load_rows(DatasetSource(path=str(FIXTURES / "sharegpt.json")), system_prompt="Default.")
    without = load_rows(DatasetSource(path=str(FIXTURES / "messages.jsonl")), system_prompt="Default.")
    assert with_system[0]["messages"][0]["content"] == "Be brief."
    assert without[0]["messages"][0] == {"role": "system", "content": "Default."}


# ------------------------------------------------------------------------------------ templates and masks


def trained_text(tokenizer, tokenized: dict) -> str:
    return tokenizer.decode([t for t, m in zip(tokenized["input_ids"], tokenized["assistant_masks"], strict=True)
                             if m])


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Italy?"},
                {"role": "assistant", "content": "Rome."}, {"role": "user", "content": "And of Spain?"},
                {"role": "assistant", "content": "Madrid."}]


@pytest.fixture
def llama3_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                                "<|eot_id|>"]})
    tokenizer.chat_template = CHAT_TEMPLATES["llama-3"]
    return tokenizer


def test_llama3_template_masks_exactly_the_assistant_turns(llama3_tokenizer):
    tokenized = tokenize_conversation(llama3_tokenizer, CONVERSATION, loss_on="completion")
    assert trained_text(llama3_tokenizer, tokenized) == "Rome.<|eot_id|>Madrid.<|eot_id|>"
    ids = tokenized["input_ids"]
    assert ids[-1] == llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_mistral_template_trains_the_answer_and_its_eos(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = CHAT_TEMPLATES["mistral"]
    tokenized = tokenize_conversation(tokenizer, CONVERSATION, loss_on="completion")
    assert trained_text(tokenizer, tokenized) == " Rome.<|im_end|> Madrid.<|im_end|>"  # eos of the tiny tokenizer


def test_template_without_an_end_of_turn_token_gets_eos_appended_and_trained(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    tokenized = tokenize_conversation(tokenizer, CONVERSATION[1:3], loss_on="completion")
    assert tokenized["input_ids"][-1] == tokenizer.eos_token_id
    assert trained_text(tokenizer, tokenized) == " Rome.\n<|im_end|>"  # BPE merges the space into " Rome"


def test_every_named_template_is_known_to_the_recipe():
    assert set(CHAT_TEMPLATE_NAMES) == {"model", *CHAT_TEMPLATES}


def test_named_template_in_the_recipe_replaces_the_tokenizer_template(make_recipe, tiny_model_dir):
    from qlora_kit.model import load_tokenizer

    recipe = load_recipe(make_recipe(data={"chat_template": "mistral"}))
    tokenizer = load_tokenizer(recipe, str(tiny_model_dir))
    assert "[INST]" in tokenizer.apply_chat_template(CONVERSATION[1:3], tokenize=False)


def test_unknown_template_name_is_a_recipe_error_with_a_suggestion(make_recipe):
    with pytest.raises(RecipeError, match=r"data.chat_template: unknown template 'lama-3' \(did you mean 'llama-3'"):
        load_recipe(make_recipe(data={"chat_template": "lama-3"}))


# ---------------------------------------------------------------------------------------------- length policy


def longest_shout_row(make_recipe, tiny_tokenizer) -> int:
    return build_datasets(load_recipe(make_recipe(data={"cache": False})), tiny_tokenizer).stats["train"]["lengths"][-1]


def test_overlong_rows_are_truncated_and_counted(make_recipe, tiny_tokenizer, caplog):
    limit = longest_shout_row(make_recipe, tiny_tokenizer) - 2
    recipe = load_recipe(make_recipe(training={"max_length": limit}, data={"cache": False}))
    with caplog.at_level(logging.WARNING, logger="qlora_kit"):
        data = build_datasets(recipe, tiny_tokenizer)
    assert max(len(ids) for ids in data.train["input_ids"]) == limit
    truncated = data.stats["train"]["truncated"]
    assert truncated > 0 and f"{truncated} rows truncated" in caplog.text
    assert len(data.train) == 40  # truncation keeps every row that still has a trained token


def test_overlong_rows_can_be_dropped_and_all_dropped_is_an_error(make_recipe, tiny_tokenizer):
    limit = longest_shout_row(make_recipe, tiny_tokenizer) - 2
    recipe = load_recipe(make_recipe(training={"max_length": limit}, data={"overlong": "drop", "cache": False}))
    data = build_datasets(recipe, tiny_tokenizer)
    assert data.stats["train"]["dropped_too_long"] > 0
    assert data.stats["train"]["dropped_too_long"] + len(data.train) == 40
    assert max(len(ids) for ids in data.train["input_ids"]) <= limit
    too_short = load_recipe(make_recipe(training={"max_length": 8}, data={"overlong": "drop", "cache": False}))
    with pytest.raises(DataError, match=r"no rows left after applying training.max_length=8 .*longest row has"):
        build_datasets(too_short, tiny_tokenizer)


# -------------------------------------------------------------------------------------------------- bad rows


def test_bad_row_stops_with_file_and_line_by_default():
    with pytest.raises(DataError, match=r"bad_rows.jsonl: line 2: invalid JSON"):
        rows_of(FIXTURES / "bad_rows.jsonl")


def test_bad_rows_can_be_skipped_and_are_counted_with_reasons(make_recipe, tiny_tokenizer, caplog):
    recipe = load_recipe(make_recipe(data={"datasets": [{"path": str(FIXTURES / "bad_rows.jsonl")}],
                                           "on_bad_rows": "skip", "cache": False}))
    with caplog.at_level(logging.WARNING, logger="qlora_kit"):
        data = build_datasets(recipe, tiny_tokenizer)
    assert len(data.train) == 2
    skipped = data.stats["skipped_bad_rows"]
    assert skipped["count"] == 4
    reasons = " | ".join(skipped["first_reasons"])
    for expected in ("line 2: invalid JSON", "line 3: the conversation ends on a user turn",
                     "line 4: turn 0: unknown role 'robot'", "line 5: turn 1 (assistant): content is empty"):
        assert expected in reasons
    assert "skipped 4 bad rows" in caplog.text


# ----------------------------------------------------------------------------------------------------- cache


def test_tokenized_cache_is_reused_and_invalidated_by_an_edit(make_recipe, tiny_tokenizer, tmp_path, monkeypatch,
                                                               caplog):
    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path / "cache"))
    data_file = tmp_path / "edit_me.jsonl"
    data_file.write_text((FIXTURES / "messages.jsonl").read_text() * 3)
    recipe = load_recipe(make_recipe(data={"datasets": [{"path": str(data_file)}]}))
    first = build_datasets(recipe, tiny_tokenizer)
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        again = build_datasets(recipe, tiny_tokenizer)
    assert "using the tokenized cache" in caplog.text
    assert again.train["input_ids"] == first.train["input_ids"]

    data_file.write_text(data_file.read_text().replace('"hi"', '"hello there"'))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        edited = build_datasets(recipe, tiny_tokenizer)
    assert "using the tokenized cache" not in caplog.text
    assert "hello there" in tiny_tokenizer.decode(edited.train[0]["input_ids"])


def test_a_tokenized_cache_built_by_other_code_is_not_read(make_recipe, tiny_tokenizer, tmp_path, monkeypatch,
                                                           caplog):
    """The key covers the code that builds the rows and stats (qlora_kit/data.py, tokenizer library versions): after
    an upgrade, a cache of the old format is rebuilt, not served."""
    import qlora_kit.data

    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(make_recipe(data={"datasets": [{"path": str(FIXTURES / "messages.jsonl")}]}))
    build_datasets(recipe, tiny_tokenizer)
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        build_datasets(recipe, tiny_tokenizer)
    assert "using the tokenized cache" in caplog.text
    monkeypatch.setattr(qlora_kit.data, "tokenization_code", lambda: "another version of data.py")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        rebuilt = build_datasets(recipe, tiny_tokenizer)
    assert "using the tokenized cache" not in caplog.text
    assert len(list((tmp_path / "cache" / "data").iterdir())) == 2 and rebuilt.stats["train"]["rows"] > 0


# --------------------------------------------------------------------------------------------------- packing


def test_packed_examples_do_not_attend_to_each_other(tiny_model_dir, tiny_tokenizer):
    """Padding-free packing: positions restart per example and logits equal those of each example run alone."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    examples = [tokenize_conversation(tiny_tokenizer, [{"role": "user", "content": q},
                                                       {"role": "assistant", "content": a}], "completion")
                for q, a in [("Shout the words apple river.", "APPLE RIVER"), ("Say hi.", "hi")]]
    collator = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.pad_token_id, padding_free=True)
    batch = collator([{"input_ids": e["input_ids"]} for e in examples])
    first_len = len(examples[0]["input_ids"])
    assert batch["position_ids"][0, first_len].item() == 0  # positions restart at the second example
    with torch.no_grad():
        # use_cache=False as trl's SFTTrainer passes in training: with a cache, transformers skips packed-mask detection
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples]
    torch.testing.assert_close(packed[:first_len], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[first_len:], alone[1], atol=1e-5, rtol=1e-4)


def test_recipe_packing_turns_on_trl_bfd_packing_and_padding_free(make_recipe, tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoConfig

    from qlora_kit.speed import Machine, decide_speed_plan
    from qlora_kit.trainers import build_config

    recipe = load_recipe(make_recipe(training={"packing": True}))
    plan = decide_speed_plan(recipe, AutoConfig.from_pretrained(tiny_model_dir), Machine.measure(), 0)
    config = build_config(recipe, tmp_path, torch.float32, has_eval=False, plan=plan)
    assert config.packing and config.padding_free and config.packing_strategy == "bfd"


# --------------------------------------------------------------------------------------------------- dry run


def test_data_dry_run_reports_rows_lengths_mask_and_memory(make_recipe, capsys):
    from qlora_kit.cli import main

    assert main(["data", str(make_recipe(data={"cache": False}, training={"gradient_checkpointing": True}))]) == 0
    out = capsys.readouterr().out
    assert "train: 40 rows (of 40 read)" in out
    assert "length p50" in out and "max_length 64" in out
    assert "⟦SHOUT" in out or "⟦" in out.split("example 0")[1]
    assert "<|im_end|>" in out.split("⟦")[-1]  # the end-of-turn token is inside the trained span
    assert "estimated peak GPU memory:" in out or "estimated peak GPU memory for rows up to" in out
    assert "speed.keep_activations_layers (auto):" in out and "as many as fit on the GPU when training starts" in out


def test_the_dry_run_estimates_memory_for_the_longest_row_not_max_length(make_recipe, capsys, tiny_tokenizer):
    """Rows far shorter than max_length: the estimate is the one the run's speed plan uses, for its longest row."""
    import re

    from transformers import AutoConfig

    from qlora_kit.cli import main
    from qlora_kit.data import build_datasets, longest_training_row
    from qlora_kit.memory import estimate_memory_for_config, rows_of_length

    path = make_recipe(data={"cache": False}, training={"gradient_checkpointing": True, "max_length": 512,
                                                         "batch_size": 8})
    assert main(["data", str(path)]) == 0
    out = capsys.readouterr().out
    recipe = load_recipe(path)
    longest = longest_training_row(build_datasets(recipe, tiny_tokenizer), recipe)
    shown = re.search(rf"estimated peak GPU memory for rows up to {longest} tokens \(the longest; max_length "
                      r"512\): ([\d.]+) GiB", out)
    assert shown, out
    config = AutoConfig.from_pretrained(recipe.model.name)
    sized = estimate_memory_for_config(rows_of_length(recipe, longest), config)["total"]
    assert float(shown.group(1)) == pytest.approx(sized, abs=0.05)
    assert estimate_memory_for_config(recipe, config)["activations"] > \
        estimate_memory_for_config(rows_of_length(recipe, longest), config)["activations"]


def test_data_dry_run_shows_the_host_memory_of_offloaded_checkpoints(make_recipe, capsys):
    from qlora_kit.cli import main

    recipe = make_recipe(data={"cache": False}, training={"gradient_checkpointing": True},
                         speed={"offload_checkpoints": True})
    assert main(["data", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "host memory for the offloaded checkpoints (speed.offload_checkpoints):" in out
    assert "speed.keep_activations_layers" not in out  # auto keeps none with offloaded checkpoints


# ------------------------------------------------------------------------------------------------ stopping


def test_a_short_fine_tune_teaches_the_model_to_stop_on_its_own(make_recipe):
    """Every example ends with the trained end-of-turn token, so after training generation ends before the budget."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_kit.evaluate import generate_answers
    from qlora_kit.pipeline import run_training

    recipe = load_recipe(make_recipe(
        "stops", quantization={"load_in_4bit": False}, lora={"r": 16, "alpha": 32},
        training={"max_steps": 60, "batch_size": 8, "learning_rate": 1e-2, "logging_steps": 20, "save_steps": 1000},
        data={"cache": False}, export={"merge": False}))
    run_training(recipe)
    adapter = recipe.run_dir / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    generation = json.loads((adapter / "generation_config.json").read_text())
    stop_ids = generation["eos_token_id"] if isinstance(generation["eos_token_id"], list) else \
        [generation["eos_token_id"]]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_ids
    base = AutoModelForCausalLM.from_pretrained(recipe.model.name, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter)
    prompts = [[{"role": "user", "content": "Shout the words apple river."}],
               [{"role": "user", "content": "Shout the words tiger lemon."}]]
    budget = 40
    with torch.no_grad():
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=budget, do_sample=False, eos_token_id=stop_ids,
                             pad_token_id=tokenizer.pad_token_id)
        with model.disable_adapter():
            untrained = model.generate(**batch, max_new_tokens=budget, do_sample=False, eos_token_id=stop_ids,
                                       pad_token_id=tokenizer.pad_token_id)
    assert untrained.shape[1] - batch["input_ids"].shape[1] == budget  # the random base runs to the budget
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        generated = row[: next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))]
        assert generated[-1] in stop_ids and len(generated) < budget  # stopped by itself, not by the budget
    answers = generate_answers(model, tokenizer, prompts, budget, 2, stop_ids)
    assert all(len(a) < 60 for a in answers)


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_jsonl_lines_end_at_newlines_only_not_at_unicode_line_separators(tmp_path, newline):
    """JSON strings may hold U+2028, U+2029 and U+0085 unescaped (json.dumps(ensure_ascii=False) writes them): they
    are text inside a row, not line ends, so a valid file reads whole and later lines keep their numbers."""
    from qlora_kit.data import read_records

    rows = [{"prompt": f"one\u2028two\u2029three\u0085four {i}", "completion": "A"} for i in range(3)]
    path = tmp_path / "rows.jsonl"
    path.write_text(newline.join(json.dumps(row, ensure_ascii=False) for row in rows) + newline + "{" + newline,
                    newline="")
    records = read_records(str(path))
    assert [record for _, record in records[:3]] == rows
    assert records[3][0] == f"{path}: line 4" and "invalid JSON" in records[3][1].reason


def test_a_grpo_column_of_mixed_types_is_named(make_recipe, tmp_path):
    from qlora_kit.data import DataError, prompt_dataset

    with pytest.raises(DataError, match=r"column 'answer' holds int and str values. Give each column the same type"):
        prompt_dataset([{"prompt": "x", "answer": "1"}, {"prompt": "y", "answer": 2}])


ROW_PC = {"prompt": "Shout apple.", "completion": "APPLE"}


def rows_read(make_recipe, path, method: str = "sft", **entry) -> int:
    """How many training rows `validate` sees for one data source (data.training_rows: no tokenizer, no model)."""
    from qlora_kit.data import training_rows

    recipe = make_recipe(method=method, data={"datasets": [{"path": str(path), **entry}], "validation": None})
    return training_rows(load_recipe(recipe))


@pytest.mark.parametrize(("text", "message"), [
    ("prompt,completion\nShout b,B,zz\nShout apple.,APPLE,yy\n",  # pandas made the first field an index: shifted
     r"rows.csv: row 1: 3 fields where the header has 2; quote a field that holds a comma"),
    ("prompt,completion\nShout b,B\nShout a, please,A\n", r"rows.csv: row 2: 3 fields where the header"),
    ("prompt,completion\n", r"rows.csv: no rows below the header"),
    ("prompt,prompt,completion\na,b,c\n", r"rows.csv: the column 'prompt' appears twice in the header"),
])
def test_a_csv_row_with_another_number_of_fields_is_refused_not_shifted(make_recipe, tmp_path, text, message):
    from qlora_kit.data import DataError

    path = tmp_path / "rows.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        rows_read(make_recipe, path)
    path.write_text('prompt,completion\n"Shout a, please",A\n"two\nlines",B\n')  # quoted: commas and newlines fine
    assert rows_read(make_recipe, path) == 2


def test_binary_or_empty_tables_say_what_they_are(make_recipe, tmp_path):
    import gzip

    from qlora_kit.data import DataError

    table = tmp_path / "rows.parquet"
    Dataset.from_list([ROW_PC]).to_parquet(str(table))
    inside = tmp_path / "rows.jsonl.gz"
    inside.write_bytes(gzip.compress(table.read_bytes()))
    with pytest.raises(DataError, match=r"rows.jsonl.gz: holds a Parquet table \(name it .parquet, uncompressed"):
        rows_read(make_recipe, inside)
    Dataset.from_list([ROW_PC]).select([]).to_parquet(str(table))
    with pytest.raises(DataError, match=r"rows.parquet: the Parquet table has no rows"):
        rows_read(make_recipe, table)


def test_folders_skip_hidden_files_and_read_suffixes_in_any_case(make_recipe, tmp_path):
    """macOS's ._ copies, .git and other hidden entries are not data; ROWS.JSONL and rows.Jsonl.GZ are."""
    import gzip

    folder = tmp_path / "data"
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "config.json").write_text("{not data")
    (folder / "._rows.jsonl").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (folder / "ROWS.JSONL").write_text(json.dumps(ROW_PC) + "\n")
    (folder / "more.Jsonl.GZ").write_bytes(gzip.compress((json.dumps(ROW_PC) + "\n").encode()))
    assert rows_read(make_recipe, folder) == 2


def test_a_datasets_save_to_disk_folder_is_read_as_its_rows(make_recipe, tmp_path):
    from datasets import DatasetDict

    from qlora_kit.data import DataError

    Dataset.from_list([ROW_PC] * 3).save_to_disk(str(tmp_path / "saved"))
    assert rows_read(make_recipe, tmp_path / "saved") == 3
    DatasetDict({"train": Dataset.from_list([ROW_PC] * 2), "test": Dataset.from_list([ROW_PC])}).save_to_disk(
        str(tmp_path / "dict"))
    assert rows_read(make_recipe, tmp_path / "dict") == 2
    assert rows_read(make_recipe, tmp_path / "dict", split="test") == 1
    with pytest.raises(DataError, match=r"dict: the saved DatasetDict has no split 'validation'; set the entry's "
                                        r"`split` to one of train, test"):
        rows_read(make_recipe, tmp_path / "dict", split="validation")
    files = tmp_path / "rows.jsonl"
    files.write_text(json.dumps(ROW_PC) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl: split 'test' applies to a Hub dataset or a datasets "
                                        r"save_to_disk folder, not to data files"):
        rows_read(make_recipe, files, split="test")


@pytest.mark.parametrize(("entry", "message"), [
    ({"path": ""}, r"data.datasets\[0\].path: the path is empty; name a data file"),
    ({"path": "rows.jsonl", "config": "en"}, r"data.datasets\[0\].config: applies to a Hub dataset"),
    ({"path": "rows.jsonl", "revision": "main"}, r"data.datasets\[0\].revision: applies to a Hub dataset"),
])
def test_hub_only_keys_and_an_empty_path_are_refused_on_local_files(make_recipe, entry, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(make_recipe(data={"datasets": [entry]}))


@pytest.mark.parametrize(("rows", "method", "message"), [
    ([{**ROW_PC, "label": False}], "sft", r"line 1: the rows carry a `label` \(KTO's desirable / undesirable "
                                          r"answers\): method sft would train on every completion.*`method: kto`"),
    ([{"prompt": "x", "chosen": "a", "rejected": "b"}], "sft",
     r"cannot tell the row format .*\(chosen/rejected pairs train a preference method: set `method: dpo`"),
    ([ROW_PC, {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}], "sft",
     r"line 2: missing field 'prompt'.*\(the row looks like format messages, but .*rows.jsonl: line 1 made this "
     r"source format prompt_completion: a file, folder or glob holds one format; give each format its own"),
])
def test_rows_of_another_method_or_format_say_which_and_the_fix(make_recipe, tmp_path, rows, method, message):
    from qlora_kit.data import DataError

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=message):
        rows_read(make_recipe, path, method=method)


def test_a_local_dataset_named_as_hub_or_a_wrong_split_says_which_key_to_fix(make_recipe, tmp_path):
    from qlora_kit.data import DataError, training_rows

    Dataset.from_list([ROW_PC]).save_to_disk(str(tmp_path / "saved"))
    recipe = make_recipe(data={"datasets": [{"hub": str(tmp_path / "saved")}], "validation": None})
    with pytest.raises(DataError, match=r"hub: .*saved is a local folder; name it with `path:` instead of `hub:`"):
        training_rows(load_recipe(recipe))
    folder = tmp_path / "local_hub"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps(ROW_PC) + "\n")
    recipe = make_recipe(data={"datasets": [{"hub": str(folder), "split": "validation"}], "validation": None})
    with pytest.raises(DataError, match=r"Unknown split \"validation\".*; set the entry's `split`"):
        training_rows(load_recipe(recipe))
