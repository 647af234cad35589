"""`qlora-kit chat` (streamed, one-shot or interactive) and `qlora-kit eval` (held-out loss and generation metrics for
the base and the adapter in one table), on the shared finished run."""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_kit.chat import chat_loop, chat_once, start_conversation
from qlora_kit.evaluate import evaluate_run, load_trained_model, matches
from qlora_kit.recipe import QloraKitError


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora_kit", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(finished_run):
    return load_trained_model(finished_run)


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A private copy of the finished run, for tests that write into it (eval.json, report/)."""
    return shutil.copytree(finished_run, tmp_path / "run")


# ---------------------------------------------------------------------------------------------------- chat


def test_one_shot_chat_streams_the_answer_and_stops_at_the_end_of_turn(trained):
    streamed = io.StringIO()

    reply = chat_once(trained, "Shout the words apple river.", temperature=0, max_new_tokens=40, out=streamed)

    assert reply.text and reply.text == reply.text.upper()  # it learned to answer in capitals
    assert reply.stopped and reply.new_tokens < 40  # ended on <|im_end|>, not on the token budget
    assert streamed.getvalue() == reply.text + "\n"
    assert "<|im_end|>" not in streamed.getvalue()


def test_chat_stops_on_every_end_of_turn_id_of_the_adapter(trained, tiny_tokenizer):
    generation_config = json.loads((trained.run_dir / "adapter" / "generation_config.json").read_text())
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")

    assert im_end in trained.stop_ids
    assert set(trained.stop_ids) >= set(generation_config["eos_token_id"] if isinstance(
        generation_config["eos_token_id"], list) else [generation_config["eos_token_id"]])


def test_chat_uses_the_training_template_and_system_prompt(trained):
    messages = [*start_conversation(trained, None), {"role": "user", "content": "hi"}]
    prompt = trained.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    assert messages[0] == {"role": "system", "content": "Answer in capitals."}  # the recipe's data.system_prompt
    assert prompt == ("<|im_start|>system\nAnswer in capitals.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert start_conversation(trained, "") == []  # --system "" drops it


def test_interactive_chat_answers_each_turn_until_exit(trained):
    typed = iter(["Shout the words stone cloud.", "/reset", "", "Shout the words tiger piano.", "/exit", "never read"])
    transcript = io.StringIO()

    chat_loop(trained, temperature=0, max_new_tokens=40, read=lambda prompt: next(typed), out=transcript)

    lines = transcript.getvalue().splitlines()
    assert lines[0].startswith(f"chatting with {trained.run_dir} (adapter;")
    answers = [line.removeprefix("assistant> ") for line in lines if line.startswith("assistant> ")]
    assert len(answers) == 2 and all(answers)
    assert "(history cleared)" in lines
    assert next(typed) == "never read"


def test_interactive_chat_ends_on_ctrl_d(trained):
    def end_of_input(prompt: str) -> str:
        raise EOFError

    transcript = io.StringIO()
    chat_loop(trained, read=end_of_input, out=transcript)

    assert transcript.getvalue().count("\n") == 2  # banner, then a clean newline


def test_chat_command_one_shot_prints_the_answer(finished_run):
    result = run_cli("chat", str(finished_run), "--prompt", "Shout the words lemon candle.", "--temperature", "0",
                     "--max-new-tokens", "40")

    assert result.returncode == 0, result.stderr
    answer = result.stdout.strip()
    assert answer and answer == answer.upper()


def test_chat_with_the_merged_model_answers_and_stops(finished_run):
    merged = load_trained_model(finished_run, merged=True)

    reply = chat_once(merged, "Shout the words forest rocket.", temperature=0, max_new_tokens=40)

    assert type(merged.model).__name__ == "LlamaForCausalLM"  # plain transformers, no peft wrapper
    assert reply.text and reply.stopped


# ---------------------------------------------------------------------------------------------------- eval


def test_eval_scores_base_and_adapter_on_the_held_out_split(run_copy):
    summary = json.loads((run_copy / "summary.json").read_text())

    report = evaluate_run(run_copy)

    base, adapter = report["results"]["base"], report["results"]["adapter"]
    assert report["rows"] == 8 and report["generated_rows"] == 8
    assert adapter["loss"] < base["loss"]
    assert adapter["loss"] == pytest.approx(summary["eval_loss"], rel=0.02)  # the trainer's eval loss, recomputed
    assert adapter["perplexity"] == pytest.approx(math.exp(adapter["loss"]))
    assert adapter["scores"]["exact_match"] == summary["generation"]["after"]["score"]
    assert base["scores"]["exact_match"] == summary["generation"]["before"]["score"]
    assert set(adapter["scores"]) == {"exact_match", "contains", "json_equal"}
    assert json.loads((run_copy / "eval.json").read_text()) == report


def test_eval_command_prints_one_before_after_table_and_updates_the_report(run_copy, tmp_path):
    rows = [{"prompt": "Shout the words apple river.", "completion": "APPLE RIVER"},
            {"prompt": "Shout the words stone cloud.", "completion": "STONE CLOUD"},
            {"prompt": "Shout the words tiger piano.", "completion": "TIGER PIANO"}]
    data = tmp_path / "extra.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    result = run_cli("eval", str(run_copy), "--data", str(data), "--max-samples", "2")

    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| metric | base | adapter | change |"
    assert [row.split("|")[1].strip() for row in table[2:]] == [
        "loss", "perplexity", "exact_match", "contains", "json_equal"]
    assert f"3 rows from {data}; generation metrics on the first 2" in result.stdout
    assert "Evaluation (`qlora-kit eval`: base vs adapter)" in (run_copy / "report" / "report.md").read_text()


def test_eval_of_a_run_without_held_out_split_asks_for_data(run_copy):
    recipe = yaml.safe_load((run_copy / "recipe.yaml").read_text())
    recipe["data"]["validation"] = None
    (run_copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    with pytest.raises(QloraKitError, match=r"no held-out split \(data.validation is null\); pass --data FILE"):
        evaluate_run(run_copy)


@pytest.mark.parametrize(("answer", "reference", "metric", "expected"), [
    ("APPLE RIVER", "APPLE RIVER", "exact_match", True),
    ("  APPLE RIVER\n", "APPLE RIVER", "exact_match", True),
    ("APPLE RIVERS", "APPLE RIVER", "exact_match", False),
    ("Sure: APPLE RIVER!", "APPLE RIVER", "contains", True),
    ("APPLE", "APPLE RIVER", "contains", False),
    ('{"age": 21, "name": "Kira"}', '{"name": "Kira", "age": 21}', "json_equal", True),
    ('{"name":"Kira","age":21.0}', '{"name": "Kira", "age": 21}', "json_equal", True),
    ('{"name": "Kira", "age": 22}', '{"name": "Kira", "age": 21}', "json_equal", False),
    ('{"name": "Kira", "age": 21', '{"name": "Kira", "age": 21', "json_equal", False),  # unparsable never matches
])
def test_generation_metrics(answer, reference, metric, expected):
    assert matches(answer, reference, metric) is expected


@pytest.mark.gpu
def test_chat_and_eval_run_on_cuda(tmp_path, recipe_writer):
    import torch

    from qlora_kit.pipeline import run_training
    from qlora_kit.recipe import load_recipe

    recipe = recipe_writer(tmp_path, "cuda", data={"validation": 8, "cache": False},
                           training={"max_steps": 30, "batch_size": 16, "learning_rate": 1e-2},
                           export={"merge": False, "report": False})
    run_training(load_recipe(recipe))
    run = tmp_path / "outputs" / "cuda"
    trained = load_trained_model(run)

    reply = chat_once(trained, "Shout the words apple river.", temperature=0, max_new_tokens=40)
    report = evaluate_run(run)

    assert trained.model.device.type == "cuda"
    assert reply.text and reply.stopped
    assert report["results"]["adapter"]["loss"] < report["results"]["base"]["loss"]
    assert torch.cuda.max_memory_allocated() > 0
