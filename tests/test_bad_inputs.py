"""The catalogue of bad inputs: each fails with qlora-kit's own error type and a message that says what to fix.

Each case writes what a user might write, runs what the user would run, and checks the error class and message;
none may leave a run folder behind for the next run to trip over.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from qlora_kit.data import DataError
from qlora_kit.pipeline import run_training
from qlora_kit.recipe import QloraKitError, RecipeError, load_recipe


@dataclass
class Case:
    name: str
    run: Callable[[Callable, Path], object]  # (make_recipe, tmp_path) -> runs the user's command
    error: type[Exception]
    message: str  # a regex the message must match


def recipe_with(**sections):
    return lambda make_recipe, tmp: load_recipe(make_recipe(**sections))


def train_with(**sections):
    return lambda make_recipe, tmp: run_training(load_recipe(make_recipe(**sections)))


def raw_recipe(text: str):
    def run(make_recipe, tmp: Path):
        path = tmp / "raw.yaml"
        path.write_text(text)
        return load_recipe(path)
    return run


def with_override(*overrides: str):
    return lambda make_recipe, tmp: load_recipe(make_recipe(), list(overrides))


def data_file(lines: list[str], training: dict | None = None, **data):
    def run(make_recipe, tmp: Path):
        path = tmp / "rows.jsonl"
        path.write_text("\n".join(lines) + "\n")
        return run_training(load_recipe(make_recipe(data={"datasets": [{"path": str(path)}], "cache": False,
                                                          **data}, training=training or {})))
    return run


def tokenizer_without_template(make_recipe, tmp: Path):
    import shutil

    folder = tmp / "no-template"
    shutil.copytree(Path(load_recipe(make_recipe()).model.name), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return run_training(load_recipe(make_recipe(model={"name": str(folder)})))


def unwritable_output(make_recipe, tmp: Path):
    blocker = tmp / "a-file"
    blocker.write_text("not a folder")
    return run_training(load_recipe(make_recipe(training={"output_dir": str(blocker / "outputs")})))


def existing_run(make_recipe, tmp: Path):
    recipe = load_recipe(make_recipe())
    recipe.run_dir.mkdir(parents=True)
    (recipe.run_dir / "qlora_kit_run.json").write_text("{}\n")
    return run_training(recipe)


def overwrite_of_a_folder_qlora_kit_did_not_create(make_recipe, tmp: Path):
    recipe = load_recipe(make_recipe(), ["training.overwrite=true"])
    recipe.run_dir.mkdir(parents=True)
    (recipe.run_dir / "recipe.yaml").write_text("model: {name: x}\n")  # looks like a recipe, is not our run
    return run_training(recipe)


def bf16_on_a_gpu_without_it(make_recipe, tmp: Path):
    from qlora_kit import model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
        patch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
        return model.resolve_dtype("bf16", "quantization.compute_dtype")


def out_of_memory(make_recipe, tmp: Path):
    from transformers import Trainer

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "train", oom)
        return run_training(load_recipe(make_recipe()))


def logging_integration_not_installed(make_recipe, tmp: Path):
    from transformers.integrations import integration_utils

    with pytest.MonkeyPatch.context() as patch:  # as on a machine without wandb, whether or not this one has it
        patch.setattr(integration_utils, "get_available_reporting_integrations", lambda: ["tensorboard"])
        return load_recipe(make_recipe(training={"report_to": ["wandb"]}))


def merge_of_a_folder_that_is_not_a_run(make_recipe, tmp: Path):
    from qlora_kit.export import merge_adapter

    (tmp / "adapter").mkdir()
    (tmp / "adapter" / "adapter_config.json").write_text("{}")
    return merge_adapter(tmp)


GOOD_ROW = '{"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}'

CASES = [
    Case("malformed YAML names the line", raw_recipe("model:\n  name: x\n lora: [\n"), RecipeError,
         r"raw.yaml: line \d+, column \d+: invalid YAML"),
    Case("empty recipe", raw_recipe(""), RecipeError, r"the recipe is empty"),
    Case("recipe that is a list", raw_recipe("- a\n- b\n"), RecipeError, r"a recipe is a mapping of sections"),
    Case("unknown section", recipe_with(trainer={"lr": 1}), RecipeError,
         r"trainer: unknown key \(did you mean 'training'\?\)"),
    Case("misspelt key", recipe_with(lora={"rank": 8}), RecipeError, r"lora.rank: unknown key \(did you mean 'lora.r'"),
    Case("misspelt nested key", recipe_with(training={"learnig_rate": 1e-4}), RecipeError,
         r"training.learnig_rate: unknown key \(did you mean 'training.learning_rate'"),
    Case("wrong type", recipe_with(training={"batch_size": "four"}), RecipeError,
         r"training.batch_size: expected an integer, got str 'four'"),
    Case("boolean given as a string", recipe_with(quantization={"double_quant": "yes"}), RecipeError,
         r"quantization.double_quant: expected true or false"),
    Case("out-of-range rank", recipe_with(lora={"r": 0}), RecipeError, r"lora.r: 0 is out of range; it must be >= 1"),
    Case("out-of-range dropout", recipe_with(lora={"dropout": 1.5}), RecipeError, r"lora.dropout: 1.5 .* <= 1"),
    Case("non-positive learning rate", recipe_with(training={"learning_rate": 0}), RecipeError,
         r"training.learning_rate: 0.0 is out of range; it must be > 0"),
    Case("unknown quant type", recipe_with(quantization={"quant_type": "nf5"}), RecipeError,
         r"'nf5' is not one of 'nf4', 'fp4' \(did you mean 'nf4'\?\)"),
    Case("4-bit and 8-bit together", recipe_with(quantization={"load_in_4bit": True, "load_in_8bit": True}),
         RecipeError, r"load_in_4bit and load_in_8bit are both true; pick one"),
    Case("missing model folder", recipe_with(model={"name": "./no/such/model"}), RecipeError,
         r"model.name: local model folder not found: ./no/such/model"),
    Case("missing GGUF file", lambda mr, tmp: load_recipe(mr(model={"name": str(tmp), "gguf_file": "x.gguf"})),
         RecipeError, r"model.gguf_file: x.gguf not found in"),
    Case("package model not installed", recipe_with(model={"name": "package:no_such_pkg_xyz"}), RecipeError,
         r"no installed package provides 'no_such_pkg_xyz'; install it"),
    Case("missing data file", recipe_with(data={"datasets": [{"path": "nowhere.jsonl"}]}), RecipeError,
         r"data.datasets\[0\].path: file not found: nowhere.jsonl"),
    Case("no training data", recipe_with(data={"datasets": []}), RecipeError, r"data.datasets: no training data"),
    Case("both path and hub", recipe_with(data={"datasets": [{"path": "a.jsonl", "hub": "b/c"}]}), RecipeError,
         r"give exactly one of `path` \(local files\) or `hub`"),
    Case("validation fraction of 1.5", recipe_with(data={"validation": 1.5}), RecipeError,
         r"data.validation: a fraction must be between 0 and 1"),
    Case("generation metric without a held-out split", recipe_with(evaluation={"metric": "exact_match"}),
         RecipeError, r"evaluation.metric: needs a held-out split; set data.validation"),
    Case("resume and overwrite together", recipe_with(training={"resume": "auto", "overwrite": True}), RecipeError,
         r"resume=auto and overwrite=true contradict each other"),
    Case("sft_args that fight the recipe", recipe_with(training={"sft_args": {"learning_rate": 1.0}}), RecipeError,
         r"training.sft_args.learning_rate: set by qlora-kit; use training.learning_rate instead"),
    Case("sft_args typo", recipe_with(training={"sft_args": {"use_ligr_kernel": True}}), RecipeError,
         r"not an SFTConfig argument \(did you mean 'use_liger_kernel'\?\)"),
    Case("bad override syntax", with_override("lora.r"), RecipeError, r"override 'lora.r': expected dotted.key=value"),
    Case("override of an unknown key", with_override("lora.rnk=8"), RecipeError,
         r"lora.rnk: unknown key \(did you mean 'lora.r'\?\)"),
    Case("max_length beyond the model's positions", train_with(training={"max_length": 4096}), RecipeError,
         r"training.max_length: 4096 is longer than the model's max_position_embeddings \(512\)"),
    Case("tokenizer without a chat template", tokenizer_without_template, RecipeError,
         r"has no chat template; set data.chat_template"),
    Case("empty dataset file", data_file([""]), DataError, r"rows.jsonl: no usable rows"),
    Case("malformed JSON line", data_file([GOOD_ROW, '{"messages": [']), DataError,
         r"rows.jsonl: line 2: invalid JSON"),
    Case("row with a misspelt field", data_file(['{"prompt": "a", "complation": "b"}']), DataError,
         r"cannot tell the row format from its fields \['complation', 'prompt'\]"),
    Case("unknown role", data_file(['{"messages": [{"role": "bot", "content": "x"}, '
                                    '{"role": "assistant", "content": "y"}]}']), DataError,
         r"line 1: turn 0: unknown role 'bot'"),
    Case("conversation ending on a user turn", data_file(['{"messages": [{"role": "user", "content": "x"}]}']),
         DataError, r"line 1: the conversation ends on a user turn"),
    Case("every row longer than max_length", data_file([GOOD_ROW], training={"max_length": 8}, overlong="drop"),
         DataError, r"no rows left after applying training.max_length=\d+"),
    Case("output folder not writable", unwritable_output, RecipeError, r"training.output_dir: cannot write"),
    Case("existing run folder", existing_run, RecipeError,
         r"already exists. Continue it with training.resume=auto, replace it with training.overwrite=true"),
    Case("overwrite of a folder qlora-kit did not create", overwrite_of_a_folder_qlora_kit_did_not_create,
         RecipeError, r"is not a qlora-kit run folder \(no qlora_kit_run.json\); qlora-kit never replaces"),
    Case("bf16 on a GPU without bf16", bf16_on_a_gpu_without_it, RecipeError,
         r"bf16 is not supported by Tesla T4; use fp16 or auto"),
    Case("CUDA out of memory", out_of_memory, QloraKitError,
         r"CUDA out of memory during training. Lower training.batch_size .*training.max_length"),
    Case("misspelt logging integration", recipe_with(training={"report_to": ["tensorbord"]}), RecipeError,
         r"training.report_to: unknown integration 'tensorbord'; did you mean 'tensorboard'\?"),
    Case("logging integration not installed", logging_integration_not_installed, RecipeError,
         r"training.report_to: wandb is not installed; `pip install wandb`"),
    Case("merge of a folder that is not a run", merge_of_a_folder_that_is_not_a_run, RecipeError,
         r"not a qlora-kit run folder \(no recipe.yaml\)"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_fails_with_an_actionable_message(case: Case, make_recipe, tmp_path):
    with pytest.raises(case.error, match=case.message):
        case.run(make_recipe, tmp_path)
    if case.name not in ("existing run folder", "overwrite of a folder qlora-kit did not create"):
        assert not (tmp_path / "outputs" / "tiny").exists(), "a failed run left a folder behind"
    else:  # the user's own folder, and it must stay as it was
        assert sorted(p.name for p in (tmp_path / "outputs" / "tiny").iterdir()) in (["qlora_kit_run.json"],
                                                                                     ["recipe.yaml"])


def test_the_catalogue_covers_at_least_thirty_distinct_bad_inputs():
    assert len({c.name for c in CASES}) == len(CASES) >= 30
