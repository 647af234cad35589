"""The catalogue of bad inputs: each fails with qlora-kit's own error type and a message that says what to fix.

Each case writes what a user might write, runs what the user would run, and checks the error class and message;
none may leave a run folder behind for the next run to trip over.
"""

from __future__ import annotations

import json
import re
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


def data_file(lines: list[str], training: dict | None = None, fields_for_data: dict | None = None, **data):
    def run(make_recipe, tmp: Path):
        path = tmp / "rows.jsonl"
        path.write_text("\n".join(lines) + "\n")
        source = {"path": str(path), **({"fields": fields_for_data} if fields_for_data else {})}
        return run_training(load_recipe(make_recipe(data={"datasets": [source], "cache": False, **data},
                                                    training=training or {})))
    return run


def encoded(path: Path, text: str, encoding: str) -> Path:
    path.write_bytes(text.encode(encoding))
    return path


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
    Case("LoRA dropout of 1", recipe_with(lora={"dropout": 1.0}), RecipeError,
         r"lora.dropout: 1 drops every input of the adapter, so it never trains; use a value below 1"),
    Case("no target modules", recipe_with(lora={"target_modules": []}), RecipeError,
         r"lora.target_modules: an empty list adapts nothing; name at least one module, or use all-linear"),
    Case("negative seed", recipe_with(training={"seed": -1}), RecipeError,
         r"training.seed: -1 is out of range; it must be >= 0"),
    Case("seed past numpy's range", recipe_with(data={"seed": 2**32}), RecipeError,
         r"data.seed: 4294967296 is out of range; it must be <= 4294967295"),
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
    Case("a GGUF file as model.name", lambda mr, tmp: load_recipe(mr(model={"name": str(
        write_bytes(tmp / "m.Q4_0.gguf", b"GGUF"))})), RecipeError,
         r"model.name: .*/m.Q4_0.gguf is a file; model.name names a model folder: set model.name: .* and "
         r"model.gguf_file: m.Q4_0.gguf"),
    Case("a weights file as model.name", lambda mr, tmp: load_recipe(mr(model={"name": str(
        write_bytes(tmp / "model.safetensors", b"{}"))})), RecipeError,
         r"model.name: .*/model.safetensors is a file; model.name names a model folder: point it at the folder "
         r"that holds it"),
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
    Case("a tool-calling conversation", data_file(['{"messages": [{"role": "user", "content": "What time is it?"}, '
                                                   '{"role": "assistant", "content": null, "tool_calls": [{"type": '
                                                   '"function", "function": {"name": "now", "arguments": "{}"}}]}, '
                                                   '{"role": "tool", "content": "12:00"}, '
                                                   '{"role": "assistant", "content": "Noon."}]}']), DataError,
         r"line 1: turn 1 \(assistant\): a tool call or tool result; qlora-kit trains on text turns only.*"
         r"data.on_bad_rows: skip"),
    Case("unknown role", data_file(['{"messages": [{"role": "bot", "content": "x"}, '
                                    '{"role": "assistant", "content": "y"}]}']), DataError,
         r"line 1: turn 0: unknown role 'bot'"),
    Case("conversation ending on a user turn", data_file(['{"messages": [{"role": "user", "content": "x"}]}']),
         DataError, r"line 1: the conversation ends on a user turn"),
    Case("every row longer than max_length", data_file([GOOD_ROW], training={"max_length": 8}, overlong="drop"),
         DataError, r"no rows left after applying training.max_length=\d+"),
    Case("output folder under a file", unwritable_output, RecipeError,
         r"training.output_dir: .*a-file is a file, not a folder; point training.output_dir at a folder"),
    Case("existing run folder", existing_run, RecipeError,
         r"already exists. Continue it with training.resume=auto, replace it with training.overwrite=true"),
    Case("overwrite of a folder qlora-kit did not create", overwrite_of_a_folder_qlora_kit_did_not_create,
         RecipeError, r"is not a qlora-kit run folder \(no qlora_kit_run.json\); qlora-kit never replaces"),
    Case("bf16 on a GPU without bf16", bf16_on_a_gpu_without_it, RecipeError,
         r"bf16 is not supported by Tesla T4; use fp16 or auto"),
    Case("CUDA out of memory", out_of_memory, QloraKitError,
         r"CUDA out of memory during training. Lower training.batch_size .*training.max_length"),
    Case("misspelt logging integration", recipe_with(training={"report_to": ["tensorbord"]}), RecipeError,
         r"training.report_to: unknown integration 'tensorbord' \(did you mean 'tensorboard'\?\)"),
    Case("logging integration not installed", logging_integration_not_installed, RecipeError,
         r"training.report_to: wandb is not installed; `pip install wandb`"),
    Case("merge of a folder that is not a run", merge_of_a_folder_that_is_not_a_run, RecipeError,
         r"not a qlora-kit run folder \(no recipe.yaml\)"),
    # ---- issue 18: duplicate keys, NaN, absurd values, names validate can check, overrides blamed on themselves
    Case("repeated section", raw_recipe("model: {name: x}\ntraining: {max_steps: 5}\nlora: {r: 8}\n"
                                         "training: {learning_rate: 1.0e-4}\n"), RecipeError,
         r"raw.yaml:4: 'training' is given twice \(first at .*raw.yaml:2\); YAML would silently keep only the second"),
    Case("repeated key inside a section", raw_recipe("model:\n  name: x\nlora:\n  r: 8\n  alpha: 16\n  r: 64\n"),
         RecipeError, r"raw.yaml:6: 'r' is given twice \(first at .*raw.yaml:4\)"),
    Case("repeated key inside a dataset entry", raw_recipe(
        "model: {name: x}\ndata:\n  datasets:\n    - path: a.jsonl\n      format: text\n      format: alpaca\n"),
        RecipeError, r"raw.yaml:6: 'format' is given twice \(first at .*raw.yaml:5\)"),
    Case("repeated key inside an override value", with_override("training={max_steps: 1, max_steps: 2}"),
         RecipeError, r"^override 'training=\{max_steps: 1, max_steps: 2\}': 'max_steps' is given twice"),
    Case("the same override twice", with_override("lora.r=8", "lora.r=16"), RecipeError,
         r"override 'lora.r=16': lora.r is already set by override 'lora.r=8'"),
    Case("absurd LoRA rank", recipe_with(lora={"r": 1000000000}), RecipeError,
         r"lora.r: 1000000000 is out of range; it must be <= 16384"),
    Case("LoRA rank above the model's hidden size", train_with(lora={"r": 128}), RecipeError,
         r"lora.r: 128 is larger than the model's hidden size \(64\).* Use at most 64"),
    Case("zero optimizer steps", recipe_with(training={"max_steps": 0}), RecipeError,
         r"training.max_steps: 0 would train nothing; use -1 to train for training.epochs, or a positive step count"),
    Case("misspelt scheduler", recipe_with(training={"lr_scheduler": "cosin"}), RecipeError,
         r"training.lr_scheduler: unknown learning-rate scheduler 'cosin' \(did you mean 'cosine'\?\); choose from"),
    Case("scheduler trl has not got", recipe_with(training={"lr_scheduler": "one_cycle"}), RecipeError,
         r"training.lr_scheduler: unknown learning-rate scheduler 'one_cycle'"),
    Case("misspelt optimizer", recipe_with(training={"optimizer": "paged_adamw8bit"}), RecipeError,
         r"training.optimizer: unknown optimizer 'paged_adamw8bit' \(did you mean 'paged_adamw_8bit'\?\)"),
    Case("optimizer name in the wrong case", recipe_with(training={"optimizer": "AdamW"}), RecipeError,
         r"training.optimizer: unknown optimizer 'AdamW'; .*choose from auto, adamw_torch"),
    Case("misspelt chat template name", recipe_with(data={"chat_template": "chatm1"}), RecipeError,
         r"data.chat_template: unknown template 'chatm1' \(did you mean 'chatml'\?\)"),
    Case("inline chat template that does not parse",
         recipe_with(data={"chat_template": "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}"}), RecipeError,
         r"data.chat_template: the inline Jinja template does not parse: line 2: unexpected '}'"),
    Case("inline chat template with an unclosed block",
         recipe_with(data={"chat_template": "{% for m in messages %}{{ m['content'] }}"}), RecipeError,
         r"data.chat_template: the inline Jinja template does not parse: line 1: .*'endfor'"),
    Case("override that is not valid YAML", with_override("lora.target_modules=[q_proj, v_proj"), RecipeError,
         r"^override 'lora.target_modules=\[q_proj, v_proj': line 1, column \d+: invalid YAML: .*; quote the value"),
    Case("override of the wrong type is blamed on the override", with_override("training.batch_size=four"),
         RecipeError, r"^override 'training.batch_size=four': training.batch_size: expected an integer"),
    Case("override of an unknown key is blamed on the override", with_override("lora.rnk=8"), RecipeError,
         r"^override 'lora.rnk=8': lora.rnk: unknown key \(did you mean 'lora.r'\?\)"),
    Case("override of an unknown section is blamed on the override", with_override("trainig.max_steps=3"),
         RecipeError, r"^override 'trainig.max_steps=3': trainig: unknown key \(did you mean 'training'\?\)"),
    Case("override that breaks a cross-key rule names the override", with_override(
        "data.datasets=[{path: a.jsonl, hub: b/c}]"), RecipeError,
         r"^override 'data.datasets=.*': data.datasets\[0\]: give exactly one of `path`"),
    Case("fields key that no format reads", recipe_with(data={"datasets": [{"path": "x.jsonl",
                                                                              "fields": {"question": "prompt"}}]}),
         RecipeError, r"data.datasets\[0\].fields.question: not a field of any format \(written the wrong way round\? "
                      r"it is \{prompt: question\}\)"),
    Case("misspelt fields key", recipe_with(data={"datasets": [{"path": "x.jsonl", "fields": {"promt": "q"}}]}),
         RecipeError, r"data.datasets\[0\].fields.promt: not a field of any format \(did you mean 'prompt'\?\)"),
    Case("fields the chosen format never reads", recipe_with(data={"datasets": [
        {"path": "x.jsonl", "format": "messages", "fields": {"prompt": "question"}}]}), RecipeError,
         r"data.datasets\[0\].fields.prompt: never used by format messages \(it reads messages and roles\)"),
    Case("roles for a format without roles", recipe_with(data={"datasets": [
        {"path": "x.jsonl", "format": "alpaca", "roles": {"bot": "assistant"}}]}), RecipeError,
         r"data.datasets\[0\].roles: never used by format alpaca"),
    Case("roles mapped to a role that does not exist", recipe_with(data={"datasets": [
        {"path": "x.jsonl", "roles": {"bot": "asistant"}}]}), RecipeError,
         r"data.datasets\[0\].roles: bot: 'asistant' is not a role \(did you mean 'assistant'\?\)"),
    Case("fields the detected format never reads", data_file([GOOD_ROW], fields_for_data={"prompt": "question"}),
         QloraKitError, r"rows.jsonl: fields.prompt: never used: the rows were detected as format messages"),
    Case("sharegpt bot role suggests assistant, not user", data_file(
        ['{"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}']), DataError,
        r"turn 1: unknown role 'bot'; map it with `roles: \{bot: assistant\}`"),
    Case("messages row with sharegpt role names", data_file(
        ['{"messages": [{"role": "human", "content": "x"}, {"role": "gpt", "content": "y"}]}']), DataError,
        r"turn 0: unknown role 'human'; use one of system, user, assistant, or map it with `roles: \{human: user\}`"),
    Case("Hub model offline and not cached", recipe_with(model={"name": "no-such-org/no-such-model"}), RecipeError,
         r"model.name: cannot load the Hub model no-such-org/no-such-model: HF_HUB_OFFLINE is set and it is not in the "
         r"Hugging Face cache .*`hf download no-such-org/no-such-model`.*or point model.name at a local model folder"),
    Case("model name that is neither folder nor Hub id", recipe_with(model={"name": "not a model id"}), RecipeError,
         r"model.name: 'not a model id' is neither a local folder nor a Hub model id"),
    Case("recipe path that is a folder", lambda mr, tmp: load_recipe(tmp), RecipeError,
         r"is a folder; pass the recipe's YAML file"),
    Case("recipe file in UTF-16", lambda mr, tmp: load_recipe(encoded(tmp / "r.yaml", "model: {name: x}\n",
                                                                     "utf-16")), QloraKitError,
         r"r.yaml: the file is UTF-16-encoded, not UTF-8; re-save the recipe as UTF-8"),
    Case("push base model that is a path", recipe_with(export={"push": {"repo_id": "a/b", "base_model": "/tmp"}}),
         RecipeError, r"export.push.base_model: '/tmp' is not a Hub model id"),
    # ---- a data sweep of 2026-12-01: values no reader expected
    Case("role that is a list", data_file(['{"messages": [{"role": ["user"], "content": "x"}, '
                                           '{"role": "assistant", "content": "y"}]}']), DataError,
         r"rows.jsonl: line 1: turn 0: the role must be a string such as 'user', got \['user'\]"),
    Case("sharegpt 'from' that is a mapping", data_file(['{"conversations": [{"from": {"a": 1}, "value": "x"}, '
                                                         '{"from": "gpt", "value": "y"}]}']), DataError,
         r"line 1: turn 0: 'from' must be a string such as 'human', got \{'a': 1\}"),
    Case("JSON nested deeper than Python reads", data_file(['{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"]),
         DataError, r"rows.jsonl: line 1: invalid JSON: nested too deeply to read"),
    Case("integer of 5,000 digits", data_file(['{"prompt": "x", "completion": "y", "n": ' + "9" * 5000 + "}"]),
         DataError, r"rows.jsonl: line 1: invalid JSON: Exceeds the limit \(4300 digits\)"),
    Case("half a surrogate pair", data_file(['{"prompt": "\\ud800 x", "completion": "y"}']), DataError,
         r"rows.jsonl: line 1: a \\uD800-\\uDFFF escape without its other half: not valid Unicode text"),
    Case("weight that leaves no rows", lambda make_recipe, tmp: data_file(
        [GOOD_ROW])(lambda **sections: make_recipe(**{**sections, "data": {
            **sections["data"], "datasets": [{**sections["data"]["datasets"][0], "weight": 0.01}]}}), tmp),
         DataError, r"rows.jsonl: weight 0.01 x 1 rows rounds to no rows; raise its weight to at least 0.5"),
    Case("module to train in full that the model lacks", train_with(lora={"modules_to_save": ["foo"]}),
         RecipeError, r"lora.modules_to_save: 'foo' is not a module of LlamaForCausalLM"),
    Case("YAML alias that contains itself", raw_recipe("model: {name: x}\ntraining: {sft_args: &a {x: [*a]}}\n"),
         RecipeError, r"raw.yaml: a YAML alias \(\*name\) refers to the value that contains it"),
    Case("YAML alias bomb", raw_recipe("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8))),
         RecipeError, r"raw.yaml: the YAML's aliases \(\*name\) expand to more than 100,000 values"),
    Case("run name longer than a folder name", recipe_with(training={"run_name": "a" * 300}), RecipeError,
         r"training.run_name: 'a+' is 300 bytes long, over the 255 a folder name may have"),
    Case("column name that is a number", data_file([GOOD_ROW], fields_for_data={"prompt": 3}), RecipeError,
         r"data.datasets\[0\].fields.prompt: 3 is not a column name"),
    Case("chat template that raises", data_file([GOOD_ROW], chat_template="{{ raise_exception('nope') }}"),
         DataError, r"data.chat_template: data.chat_template failed on a row \(TemplateError: nope\)"),
    Case("export of a path that is not a run", lambda make_recipe, tmp: __import__("qlora_kit.gguf").gguf.export_run(
        tmp / "nope", "gguf"), RecipeError, r"nope: not a qlora-kit run folder \(no recipe.yaml\)"),
    Case("report of a run whose recipe is a list", lambda make_recipe, tmp: (
        (tmp / "run").mkdir(), (tmp / "run" / "recipe.yaml").write_text("- 1\n"),
        __import__("qlora_kit.report").report.write_report(tmp / "run")), QloraKitError,
         r"run/recipe.yaml: not the recipe qlora-kit saved \(a YAML list, not a mapping of sections\)"),
    Case("alpaca input that is a number", data_file(['{"instruction": "Add one.", "input": 41, "output": "42"}']),
         DataError, r"rows.jsonl: line 1: field 'input' must be text \(or empty\), got int 41"),
    Case("recipe path that is a device", lambda make_recipe, tmp: load_recipe("/dev/null"), RecipeError,
         r"/dev/null: is not a regular file \(a device or a pipe\); pass the recipe's YAML file"),
    Case("weight of a trillion copies", recipe_with(data={"datasets": [{"path": "x.jsonl", "weight": 1.0e12}]}),
         RecipeError, r"data.datasets\[0\].weight: 1000000000000.0 is out of range; it must be <= 1000"),
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


# ------------------------------------------------------------------------------- issue 18: classes, parametrized


def float_keys() -> list[str]:
    """Every recipe key whose type admits a float (walked from the dataclasses, so a new key is covered too)."""
    import dataclasses
    import typing

    from qlora_kit.recipe import Recipe

    keys = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
            elif float in (hint, *typing.get_args(hint)):
                keys.append(f"{prefix}{f.name}")

    walk(Recipe, "")
    return keys


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "inf"])
@pytest.mark.parametrize("key", float_keys())
def test_a_number_that_is_not_finite_is_refused_for_every_numeric_key(key, value, make_recipe):
    with pytest.raises(RecipeError, match=rf"^override '{key}={value}': {key}: -?(nan|inf) is not a finite number"):
        load_recipe(make_recipe(), [f"{key}={value}"])


@pytest.mark.parametrize("where", ["training.sft_args={neftune_noise_alpha: .nan}",
                                   "data.datasets=[{path: x.jsonl, weight: .inf}]"])
def test_a_number_that_is_not_finite_is_refused_inside_mappings_and_lists(where, make_recipe):
    with pytest.raises(RecipeError, match=r"is not a finite number"):
        load_recipe(make_recipe(), [where])


def test_the_float_keys_walk_finds_the_keys_of_issue_18():
    assert {"training.learning_rate", "training.epochs", "lora.alpha", "data.validation",
            "data.datasets[].weight"} - set(float_keys()) == {"data.datasets[].weight"}  # a list item: tested above


@pytest.mark.parametrize("name", ["/etc", "../x", "a/b", "..", ".", "", " ", "a\\b", "-rf", "~", "~root", "x\ny",
                                  "x\0y", "../../outputs/other"])
def test_a_run_name_must_be_one_plain_folder_name(name, make_recipe):
    with pytest.raises(RecipeError, match=r"training.run_name: .* a run name is one folder name inside "
                                          r"training.output_dir, e.g. run_name: [\w.-]+"):
        load_recipe(make_recipe(training={"run_name": name}))


@pytest.mark.parametrize("name", ["my run", "run-2026.11.30", "Ünïcode_run", "a..b"])
def test_plain_run_names_are_kept_as_given(name, make_recipe):
    recipe = load_recipe(make_recipe(training={"run_name": name}))
    assert recipe.run_dir.name == name and recipe.run_dir.parent == Path(recipe.training.output_dir)


def test_an_override_of_a_text_key_keeps_the_text_typed(make_recipe):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    recipe = load_recipe(make_recipe(), ["training.run_name=2024", "data.system_prompt=Answer: yes or no",
                                         f"data.chat_template={template}"])
    assert (recipe.training.run_name, recipe.data.system_prompt) == ("2024", "Answer: yes or no")
    assert recipe.data.chat_template == template


def test_a_run_folder_recipe_is_read_without_importing_transformers(finished_run):
    import subprocess
    import sys

    code = ("import sys; from qlora_kit.recipe import read_run_recipe; read_run_recipe(sys.argv[1]); "
            "print('transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(finished_run)], capture_output=True, text=True,
                            timeout=300)
    assert result.stdout.strip() == "False", result.stderr  # push, report and chat start in seconds


def test_a_run_name_from_an_override_is_blamed_on_the_override(make_recipe):
    with pytest.raises(RecipeError, match=r"^override 'training.run_name=../x': training.run_name: '../x' is a path"):
        load_recipe(make_recipe(), ["training.run_name=../x"])


@pytest.mark.parametrize(("section", "key", "value", "expected"), [
    ("lora", "target_modules", "q_proj", ["q_proj"]),
    ("lora", "target_modules", "q_proj, v_proj", ["q_proj", "v_proj"]),  # an override's way to write a list
    ("lora", "modules_to_save", "lm_head", ["lm_head"]),
    ("training", "report_to", "tensorboard", ["tensorboard"]),
])
def test_one_name_where_a_list_goes_is_a_list_of_one(section, key, value, expected, make_recipe):
    recipe = load_recipe(make_recipe(**{section: {key: value}}))
    assert getattr(getattr(recipe, section), key) == expected


def test_one_dataset_mapping_where_a_list_goes_is_a_list_of_one(make_recipe, shout_files):
    recipe = load_recipe(make_recipe(data={"datasets": {"path": str(shout_files[0])}}))
    assert [d.path for d in recipe.data.datasets] == [str(shout_files[0])]


def test_target_modules_given_as_one_name_adapts_that_layer(make_recipe, tiny_model_dir):
    from qlora_kit.model import check_target_modules, targets_module

    recipe = load_recipe(make_recipe(lora={"target_modules": "q_proj"}))
    check_target_modules(recipe, str(tiny_model_dir))  # passes: the layer exists
    assert targets_module("model.layers.0.self_attn.q_proj", recipe.lora.target_modules)
    assert not targets_module("model.layers.0.self_attn.v_proj", recipe.lora.target_modules)
    # a real regular expression stays one
    regex = load_recipe(make_recipe(lora={"target_modules": r".*\.(q|v)_proj"})).lora.target_modules
    assert regex == r".*\.(q|v)_proj"


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.fixture
def cli(capsys):
    """`qlora-kit ARGS` in this process: (status, stdout, stderr); argparse refusals give their SystemExit code."""
    import logging

    from qlora_kit.cli import main

    logger = logging.getLogger("qlora_kit")
    saved = logger.handlers[:], logger.level, logger.propagate

    def invoke(*args: str) -> tuple[int, str, str]:
        try:
            status = main(list(args))
        except SystemExit as exc:
            status = exc.code
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    yield invoke
    logger.handlers[:], logger.level, logger.propagate = saved


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


ROW = {"prompt": "Say hi.", "completion": "hi"}
BAD_DATA_FILES = [
    ("rows.jsonl", (json.dumps(ROW) + "\n").encode("utf-16"), r"the file is UTF-16-encoded, not UTF-8; re-save it as "
                                                              r"UTF-8 \(e.g. `iconv -f UTF-16"),
    ("rows.json", json.dumps([ROW]).encode("utf-16-be"), r"binary or UTF-16 .*not UTF-8 text; re-save it as UTF-8"),
    ("rows.jsonl", json.dumps({"prompt": "café", "completion": "b"}, ensure_ascii=False).encode("cp1252"),
     r"line 1: byte 0xe9 is not valid UTF-8 .*re-save it as UTF-8 \(e.g. `iconv -f CP1252"),
    ("rows.csv", "prompt,completion\nSay hi.,hi\n".encode("utf-16"), r"the file is UTF-16-encoded, not UTF-8"),
    ("rows.csv", "prompt,completion\nx,y\n".encode("utf-32"), r"the file is UTF-32-encoded, not UTF-8"),
    ("rows.parquet", b"PAR1 this is not a parquet file PAR1", r"cannot be read as PARQUET \(ArrowInvalid: .*\); the "
                                                              r"file is damaged or not PARQUET: export it again"),
    ("rows.parquet", b"", r"rows.parquet: the file is empty"),
    ("rows.csv", b"", r"rows.csv: the file is empty"),
    ("rows.json", b"", r"rows.json: the file is empty"),
    ("rows.json", b"   \n", r"rows.json: the file is empty"),
    ("rows.csv", b'prompt,completion\n"Say hi.,hi\n', r"cannot be read as CSV \(ParserError"),
    ("rows.json", bytes(range(256)), r"the file is binary or UTF-16 \(it contains NUL bytes\)"),
    ("rows.jsonl", b"\x1f\x8b\x08\x00gzip", r"rows.jsonl: the file is gzip-compressed; name it rows.jsonl.gz, or "
                                            r"decompress it"),
    ("rows.csv", b"\x1f\x8b\x08\x08gzip\xff", r"the file is gzip-compressed; name it rows.csv.gz"),
    ("rows.jsonl.gz", b'{"prompt": "a", "completion": "b"}', r"cannot be decompressed as gzip \(BadGzipFile: .*\); "
                                                            r"the file is damaged or not gzip: compress it again"),
    ("rows.json.xz", b"\xfd7zXZ\x00 cut short", r"cannot be decompressed as lzma \(LZMAError"),
    ("rows.csv.bz2", b"BZh9 cut short", r"cannot be decompressed as bz2 \((OSError|ValueError|EOFError)"),
    ("rows.csv.gz", __import__("gzip").compress(b""), r"rows.csv.gz: the file is empty"),
    ("rows.json.gz", __import__("gzip").compress(b" \n"), r"rows.json.gz: the file is empty"),
    ("rows.parquet.gz", b"PAR1", r"a compressed Parquet file; Parquet compresses inside the file"),
    ("rows.txt.gz", b"Say hi.", r"rows.txt.gz: unsupported file type; use .jsonl, .json, .csv or .parquet \(the "
                                r"first three may be compressed"),
    ("rows.json", b'[{"prompt": "a", "completion": ', r"rows.json: line 1: invalid JSON"),
    ("rows.json", b'{"a": 1, "b": 2}', r"a .json dataset must be a list of rows, got dict"),
    ("rows.txt", b"Say hi.", r"rows.txt: unsupported file type; use .jsonl, .json, .csv or .parquet"),
    ("rows.gz", __import__("gzip").compress(b"{}"), r"rows.gz: unsupported file type"),
]


@pytest.mark.parametrize(("name", "data", "message"), BAD_DATA_FILES,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_DATA_FILES)])
def test_an_unreadable_data_file_is_one_message_and_exit_2(name, data, message, make_recipe, tmp_path, cli):
    path = write_bytes(tmp_path / name, data)

    status, _, err = cli("validate", str(make_recipe(data={"datasets": [{"path": str(path)}]})))

    assert status == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"qlora-kit: error: {path}") and re.search(message, err), err


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:50])


# (what is wrong with a local model folder, the command that first reads that part, what the message says)
BROKEN_MODEL_FOLDERS = [
    (lambda folder: (folder / "config.json").unlink(), "validate",
     r"model.name: .* has no config.json, so it is not a model folder; point model.name at the folder that holds"),
    (lambda folder: ((folder / "config.json").unlink(), (folder / "model.Q4_0.gguf").write_bytes(b"GGUF")),
     "validate", r"has no config.json, so it is not a model folder; set model.gguf_file to the GGUF file in it "
                 r"\(model.Q4_0.gguf\)"),
    (lambda folder: (folder / "config.json").write_text("{not json"), "validate",
     r"model.name: cannot read config.json in .* \(It looks like the config file .* is not a valid JSON file\); a "
     r"local model folder must hold what save_pretrained writes"),
    (lambda folder: (folder / "config.json").write_text('{"hidden_size": 64}'), "validate",
     r"cannot read config.json in .*Should have a `model_type` key"),
    (lambda folder: (folder / "tokenizer.json").unlink(), "data", r"model.name: cannot read the tokenizer in "),
    (lambda folder: (folder / "model.safetensors").unlink(), "train",
     r"model.name: cannot read the weights in .*no file named model.safetensors"),
    (lambda folder: truncate(folder / "model.safetensors"), "train",
     r"model.name: cannot read the weights in .*\(Error while deserializing header"),
]


@pytest.mark.parametrize(("damage", "command", "message"), BROKEN_MODEL_FOLDERS,
                         ids=["no-config", "gguf-without-gguf_file", "config-not-json", "no-model_type",
                              "no-tokenizer", "no-weights", "truncated-weights"])
def test_a_broken_local_model_folder_is_named_with_what_it_must_hold(damage, command, message, tiny_model_dir,
                                                                     make_recipe, tmp_path, cli):
    """The first command that reads the broken part says so, exit 2; not transformers' traceback as a qlora-kit bug.
    Nothing is left behind for the next run."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    damage(folder)
    recipe = make_recipe(model={"name": str(folder)}, data={"cache": False})

    status, _, err = cli(command, str(recipe))

    assert status == 2 and "Traceback" not in err and "bug in qlora-kit" not in err, err
    assert re.search(message, err), err
    assert not (tmp_path / "outputs" / "tiny").exists()


def test_a_folder_named_like_a_data_file_is_one_message(make_recipe, tmp_path, cli):
    folder = tmp_path / "rows.jsonl"
    folder.mkdir()

    status, _, err = cli("validate", str(make_recipe(data={"datasets": [{"path": str(folder)}]})))

    assert status == 2 and "Traceback" not in err
    assert f"{folder}: a folder with no data files in it" in err


def test_a_utf8_file_with_a_byte_order_mark_is_read(make_recipe, tmp_path, cli):
    path = write_bytes(tmp_path / "rows.jsonl", (json.dumps(ROW) + "\n").encode("utf-8-sig"))

    status, out, err = cli("validate", str(make_recipe(data={"datasets": [{"path": str(path)}]})))

    assert status == 0, err
    assert "valid (1 training rows" in out


def test_validate_counts_the_rows_training_reads_and_refuses_a_split_that_leaves_none(make_recipe, tmp_path, cli):
    """validate reads the rows as training does: mixed, the held-out share split off, bad rows skipped where the
    recipe says so; a held-out count as large as the data is refused there, not after the model loads."""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(ROW) + "\n" for _ in range(10)) + '{"neither": "field"}\n')
    data = {"datasets": [{"path": str(path)}], "on_bad_rows": "skip"}

    status, out, err = cli("validate", str(make_recipe(data={**data, "validation": 3})))
    assert status == 0, err
    assert "valid (7 training rows" in out

    status, _, err = cli("validate", str(make_recipe(data={**data, "validation": 10})))
    assert status == 2 and "Traceback" not in err
    assert "data.validation: 10 leaves no training rows out of 10" in err


def test_validate_refuses_the_run_folder_train_would_refuse(make_recipe, tmp_path, cli):
    """validate says before any training what train would refuse about the run folder, and says what happens to an
    earlier run it may continue or replace."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    status, _, err = cli("validate", str(make_recipe(training={"output_dir": str(blocker / "outputs")})))
    assert status == 2 and "a-file is a file, not a folder" in err, err

    recipe = make_recipe()
    run_dir = load_recipe(recipe).run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine")
    status, _, err = cli("validate", str(recipe))
    assert status == 2 and "is not a qlora-kit run folder" in err, err

    (run_dir / "qlora_kit_run.json").write_text("{}\n")
    status, _, err = cli("validate", str(recipe))
    assert status == 2 and "already exists. Continue it with training.resume=auto" in err, err
    status, out, err = cli("validate", str(recipe), "training.overwrite=true")
    assert status == 0 and "an earlier run there is replaced, training.overwrite=true" in out, err
    assert (run_dir / "notes.txt").read_text() == "mine"  # validate changes nothing


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_validate_refuses_rows_that_no_length_limit_leaves(make_recipe, tmp_path, cli, method):
    """With the model's tokenizer on this machine validate tokenizes the rows as training does: a max_length that
    drops every row is refused there, not after the model has loaded."""
    rows = tmp_path / "rows.jsonl"
    prompt = "Shout this sentence, which is longer than eight tokens in any tokenizer."
    row = ({"prompt": prompt, "chosen": prompt.upper(), "rejected": "no"} if method == "dpo"
           else {"prompt": prompt, "completion": prompt.upper()})
    rows.write_text(json.dumps(row) + "\n")
    recipe = make_recipe(method=method, data={"datasets": [{"path": str(rows)}], "overlong": "drop"},
                         training={"max_length": 8})
    status, _, err = cli("validate", str(recipe))
    assert status == 2 and "Traceback" not in err, err
    assert "no rows left after applying training.max_length=8" in err, err
    status, out, err = cli("validate", str(recipe), "training.max_length=256")
    assert status == 0 and "row lengths: 1 training rows fit the length limits" in out, err


def test_validate_refuses_an_output_folder_where_nothing_can_be_created(make_recipe, tmp_path, cli, monkeypatch):
    """Permission bits pass (as for root in /proc, /sys or on a read-only mount) but creating a folder fails:
    validate says so, as train would, and leaves nothing behind where it can write."""
    import errno
    import tempfile

    recipe = make_recipe(training={"output_dir": str(tmp_path / "outputs")})
    before = sorted(tmp_path.rglob("*"))
    status, _, err = cli("validate", str(recipe))
    assert status == 0, err
    assert sorted(tmp_path.rglob("*")) == before  # the trial folder is gone, and "outputs" was never made

    def read_only_filesystem(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only_filesystem)
    status, _, err = cli("validate", str(recipe))
    assert status == 2 and "Traceback" not in err, err
    assert f"training.output_dir: cannot create folders in {tmp_path} (Read-only file system)" in err, err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_validate_refuses_proc_as_the_output_folder(make_recipe, cli):
    status, _, err = cli("validate", str(make_recipe(training={"output_dir": "/proc/qlora-kit-runs"})))
    assert status == 2 and "Traceback" not in err, err
    assert "training.output_dir: cannot" in err and "/proc" in err, err


def test_a_data_file_whose_name_has_glob_characters_is_read_as_itself(make_recipe, tmp_path, cli):
    path = tmp_path / "rows [v2].jsonl"
    path.write_text(json.dumps(ROW) + "\n")

    status, out, err = cli("validate", str(make_recipe(data={"datasets": [{"path": str(path)}]})))

    assert status == 0, err
    assert "valid (1 training rows" in out


@pytest.mark.parametrize(("args", "message"), [
    (["chat", "RUN", "--temperature", "-1"], r"argument --temperature: -1 must be a number >= 0 \(0 = greedy\)"),
    (["chat", "RUN", "--temperature", "nan"], r"argument --temperature: nan must be a number >= 0"),
    (["chat", "RUN", "--temperature", "warm"], r"argument --temperature: 'warm' is not a number"),
    (["chat", "RUN", "--max-new-tokens", "0"], r"argument --max-new-tokens: 0 must be 1 or more"),
    (["chat", "RUN", "--max-new-tokens", "-5"], r"argument --max-new-tokens: -5 must be 1 or more"),
    (["chat", "RUN", "--max-new-tokens", "2.5"], r"argument --max-new-tokens: '2.5' is not a whole number"),
    (["eval", "RUN", "--max-samples", "0"], r"argument --max-samples: 0 must be 1 or more"),
    (["eval", "RUN", "--max-new-tokens", "0"], r"argument --max-new-tokens: 0 must be 1 or more"),
    (["eval", "RUN", "--batch-size", "0"], r"argument --batch-size: 0 must be 1 or more"),
    (["eval", "RUN", "--batch-size", "many"], r"argument --batch-size: 'many' is not a whole number"),
    (["train"], r"the following arguments are required: recipe$"),  # overrides are optional: not named
    (["chat", "RUN", "--prompt", " "], r"argument --prompt: the message is empty; write the message the model"),
])
def test_numeric_flags_are_refused_before_anything_loads(args, message, cli, monkeypatch):
    from qlora_kit import evaluate

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(evaluate, "load_trained_model", no_loading)
    status, _, err = cli(*args)

    assert status == 2
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_version_names_qlora_kit_and_the_libraries(cli):
    status, out, _ = cli("--version")

    assert status == 0
    assert re.match(r"qlora-kit \d+\.\d+", out) and "transformers" in out and "bitsandbytes" in out


def test_an_internal_error_says_it_is_a_bug_and_where_the_traceback_is(cli, tmp_path, monkeypatch):
    from qlora_kit import report

    def broken(run_dir):
        raise ZeroDivisionError("a bug deep inside")

    monkeypatch.setattr(report, "write_report", broken)
    status, _, err = cli("report", str(tmp_path))

    assert status == 1
    assert "Traceback" not in err
    assert "qlora-kit: internal error: ZeroDivisionError: a bug deep inside" in err
    assert "This is a bug in qlora-kit" in err
    log_file = Path(re.search(r"the full traceback is in (\S+)\.", err).group(1))
    assert log_file.parent == tmp_path  # the run folder the command named
    assert "Traceback" in log_file.read_text() and "ZeroDivisionError" in log_file.read_text()


def test_an_internal_error_without_a_run_folder_logs_to_a_temp_file(cli, make_recipe, monkeypatch):
    import tempfile

    from qlora_kit import publish

    monkeypatch.setattr(publish, "check_push_settings", lambda recipe: [][1])
    status, _, err = cli("validate", str(make_recipe()))

    assert status == 1 and "IndexError" in err
    log_file = Path(re.search(r"the full traceback is in (\S+)\.", err).group(1))
    assert log_file.parent == Path(tempfile.gettempdir()) and "check_push_settings" not in err
    assert "IndexError" in log_file.read_text()
    log_file.unlink()


def test_a_full_disk_is_a_user_error_not_a_bug(cli, tmp_path, monkeypatch):
    import errno
    import os

    from qlora_kit import report

    def full(run_dir):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "report"))

    monkeypatch.setattr(report, "write_report", full)
    status, _, err = cli("report", str(tmp_path))

    assert status == 2
    assert err.strip() == f"qlora-kit: error: No space left on device: {tmp_path / 'report'}"


def test_a_path_through_a_file_is_a_user_error_with_a_hint(cli, tmp_path, monkeypatch):
    """Not a directory (a part of a path the user gave is a file), wherever it is raised: one line, exit 2."""
    import errno
    import os

    from qlora_kit import report

    def under_a_file(run_dir):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(tmp_path / "notes.txt" / "report"))

    monkeypatch.setattr(report, "write_report", under_a_file)
    status, _, err = cli("report", str(tmp_path))

    assert status == 2
    assert err.strip() == (f"qlora-kit: error: Not a directory: {tmp_path / 'notes.txt' / 'report'} (a part of that "
                           "path is a file, not a folder: pick another path)")


@pytest.mark.parametrize("command", [["merge", "RUN", "--out", "FILE/merged"],
                                     ["export", "RUN", "--format", "gguf", "--out", "FILE/model.gguf"],
                                     ["export", "RUN", "--format", "gguf-lora", "--out", "FILE/sub/lora.gguf"],
                                     ["push", "RUN", "--repo-id", "u/n", "--base-model", "a/b", "--dry-run", "--out",
                                      "FILE/upload"]], ids=["merge", "gguf", "gguf-lora", "push"])
def test_an_output_under_a_file_is_named_and_the_file_kept(command, finished_run, cli, tmp_path):
    import shutil

    run = shutil.copytree(finished_run, tmp_path / "run")
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    status, _, err = cli(*[str(run) if a == "RUN" else a.replace("FILE", str(mine)) for a in command])
    assert status == 2, err
    assert f"{mine} is a file, so nothing can be written under it; pick another path" in err
    assert "merging" not in err  # refused before the work, not after it
    assert mine.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run"]


@pytest.mark.parametrize("command", ["validate", "data", "train"])
def test_a_hub_model_offline_and_not_cached_is_the_same_message_in_every_command(command, make_recipe, cli):
    recipe = make_recipe(model={"name": "no-such-org/no-such-model"})

    status, _, err = cli(command, str(recipe))

    assert status == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"qlora-kit: error: {recipe}: model.name: cannot load the Hub model no-such-org/no-such-model: HF_HUB_OFFLINE "
        f"is set and it is not in the Hugging Face cache ({hub_cache()}). Download it once on a machine with network "
        "(`hf download no-such-org/no-such-model`, then it is read from the cache, HF_HUB_OFFLINE=1 or not), or point "
        "model.name at a local model folder (or a folder with model.gguf_file)"]


def hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


@pytest.mark.parametrize("command", ["validate", "data"])
def test_a_hub_model_without_network_is_one_quick_message(command, make_recipe, cli, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_network)
    status, _, err = cli(command, str(make_recipe(model={"name": "no-such-org/no-such-model"})))

    assert status == 2 and "Traceback" not in err
    assert ("model.name: cannot load the Hub model no-such-org/no-such-model: it is not in the Hugging Face cache and "
            "the Hub cannot be reached (ConnectionError: Name or service not known)") in err
    assert "`hf download no-such-org/no-such-model`" in err


def test_a_hub_model_that_does_not_exist_is_named_by_validate(make_recipe, cli, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(*args, **kwargs):
        import httpx2

        request = httpx2.Request("HEAD", "https://huggingface.co/no-such-org/no-such-model/resolve/main/config.json")
        raise RepositoryNotFoundError("404 Repository Not Found", response=httpx2.Response(404, request=request))

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", not_found)
    status, _, err = cli("validate", str(make_recipe(model={"name": "no-such-org/no-such-model"})))

    assert status == 2
    assert "model.name: no model no-such-org/no-such-model on the Hub (or it is private" in err


def test_validate_checks_the_rank_against_the_model(make_recipe, cli):
    status, _, err = cli("validate", str(make_recipe(lora={"r": 100})))

    assert status == 2
    assert "lora.r: 100 is larger than the model's hidden size (64)" in err


def test_the_dry_run_warns_when_the_memory_estimate_fits_no_gpu(make_recipe, cli):
    status, out, err = cli("data", str(make_recipe(data={"cache": False}, training={"batch_size": 10_000_000})))

    assert status == 0, err
    assert re.search(r"WARNING: the estimated peak of [\d,.]+ GiB is more than (any single GPU made today|the "
                     r"largest GPU here).*Lower training.batch_size", out), out


def test_the_dry_run_says_nothing_about_memory_when_it_fits(make_recipe, cli):
    status, out, err = cli("data", str(make_recipe(data={"cache": False})))

    assert status == 0, err
    assert "WARNING" not in out


def test_library_noise_stays_out_of_the_terminal_unless_verbose(make_recipe):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "qlora_kit", "data", str(make_recipe(data={"cache": False}))],
                            capture_output=True, text=True, timeout=600)

    assert result.returncode == 0, result.stderr
    noise = [line for line in result.stderr.splitlines() if not line.startswith("[qlora-kit]")]
    assert noise == [], noise  # no "Failed to load CPU gemm_4bit_forward", no library warnings or progress bars


def test_a_damaged_table_file_is_one_line_in_the_terminal(make_recipe, tmp_path):
    """datasets logs a damaged Parquet file at ERROR through its own handler before raising; the terminal shows only
    qlora-kit's message. (In-process, the `cli` fixture cannot see that handler's stream: a real process can.)"""
    import subprocess
    import sys

    path = write_bytes(tmp_path / "rows.parquet", b"PAR1 this is not a parquet file PAR1")
    recipe = make_recipe(data={"datasets": [{"path": str(path)}]})
    result = subprocess.run([sys.executable, "-m", "qlora_kit", "validate", str(recipe)], capture_output=True,
                            text=True, timeout=600)

    assert result.returncode == 2
    assert result.stderr.splitlines() == [next(line for line in result.stderr.splitlines()
                                               if line.startswith(f"qlora-kit: error: {path}: cannot be read"))]


def test_verbose_leaves_the_library_loggers_alone(cli, make_recipe):
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.NOTSET)
    cli("-v", "validate", str(make_recipe()))
    assert logging.getLogger("bitsandbytes").level == logging.NOTSET
    cli("validate", str(make_recipe()), "--verbose")
    assert logging.getLogger("bitsandbytes").level == logging.NOTSET
    cli("validate", str(make_recipe()))
    assert logging.getLogger("bitsandbytes").level == logging.ERROR
    logging.getLogger("bitsandbytes").setLevel(logging.NOTSET)


# ------------------------------------------------------------------------------ after training: push, chat, eval


def published_text(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in folder.rglob("*")
                     if p.suffix in (".md", ".json", ".yaml", ".jsonl") and p.name != "tokenizer.json")


def test_an_upload_folder_names_no_local_path(finished_run, tmp_path, tiny_model_dir, caplog):
    import logging
    import sys

    from qlora_kit.publish import build_upload_folder

    with caplog.at_level(logging.WARNING, logger="qlora_kit"):
        folder = build_upload_folder(finished_run, tmp_path / "upload", "alice/shout")

    text = published_text(folder)
    for local in (str(tiny_model_dir), str(finished_run), sys.prefix, str(Path.home()) + "/"):
        assert local not in text
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    assert f"a local model folder (`{tiny_model_dir.name}`)" in (folder / "README.md").read_text()
    assert "pass --base-model HUB_ID" in caplog.text  # the dry run warns


def test_a_real_upload_of_an_adapter_asks_for_the_base_when_it_is_unknown(finished_run, tmp_path):
    from qlora_kit.publish import build_upload_folder

    with pytest.raises(QloraKitError, match=r"the Hub id of the base model is unknown \(training used a local model "
                                            r"folder .*\); pass --base-model HUB_ID"):
        build_upload_folder(finished_run, tmp_path / "upload", "alice/shout", require_base=True)


def test_a_merged_upload_needs_no_base_id(finished_run, tmp_path):
    from qlora_kit.publish import build_upload_folder

    folder = build_upload_folder(finished_run, tmp_path / "upload", "alice/shout", merged=True, require_base=True)
    assert "config.json" in {p.name for p in folder.iterdir()}


def test_a_recipe_that_uploads_an_adapter_of_a_local_base_must_name_it_before_training(make_recipe, monkeypatch):
    from qlora_kit.publish import check_push_settings

    monkeypatch.setenv("HF_TOKEN", "hf_x")
    recipe = load_recipe(make_recipe(export={"push": {"repo_id": "alice/x"}}))
    with pytest.raises(QloraKitError, match=r"export.push.base_model: the adapter's base model has no known Hub id "
                                            r"\(model.name is a local model folder"):
        check_push_settings(recipe)


def test_a_missing_token_in_a_recipe_says_how_to_train_without_uploading(make_recipe, monkeypatch, tmp_path):
    from qlora_kit.publish import check_push_settings

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    recipe = load_recipe(make_recipe(export={"push": {"repo_id": "alice/x", "base_model": "org/base"}}))
    with pytest.raises(QloraKitError) as error:
        check_push_settings(recipe)
    assert "no Hugging Face token" in str(error.value)
    assert "export.push.repo_id asks for an upload after training (set it to null" in str(error.value)
    assert "--dry-run" not in str(error.value)


def write_gguf(path: Path, **metadata: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in metadata.items():
        writer.add_string(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_recipe(folder: Path, file: str):
    from qlora_kit.recipe import ModelSection, Recipe

    return Recipe(model=ModelSection(name=str(folder), gguf_file=file))


def test_a_gguf_base_is_named_from_its_metadata_and_said_to_be_dequantized(tmp_path):
    from qlora_kit.publish import find_base_model

    write_gguf(tmp_path / "m.gguf", **{"general.name": "Tiny Chat", "general.source.repo_url":
                                       "https://huggingface.co/acme/tiny-chat"})
    base = find_base_model(gguf_recipe(tmp_path, "m.gguf"), None)

    assert base.hub_id == "acme/tiny-chat"
    assert base.described == "the GGUF file `m.gguf` (Tiny Chat)"


def test_a_gguf_base_without_a_source_is_unknown_and_described_by_name(tmp_path):
    from qlora_kit.publish import find_base_model

    write_gguf(tmp_path / "m.gguf", **{"general.name": "Tiny Chat"})
    base = find_base_model(gguf_recipe(tmp_path, "m.gguf"), None)

    assert base.hub_id is None and str(tmp_path) not in base.described


def test_a_base_in_the_hugging_face_cache_is_named_by_its_repo(tmp_path):
    from qlora_kit.publish import find_base_model
    from qlora_kit.recipe import ModelSection, Recipe

    snapshot = tmp_path / "hub" / "models--acme--tiny-chat" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert find_base_model(Recipe(model=ModelSection(name=str(snapshot))), None).hub_id == "acme/tiny-chat"


def test_chat_merged_works_when_only_the_merged_model_is_left(finished_run, tmp_path):
    import shutil

    from qlora_kit.chat import chat_once
    from qlora_kit.evaluate import load_trained_model

    run = shutil.copytree(finished_run, tmp_path / "run")
    shutil.rmtree(run / "adapter")

    trained = load_trained_model(run, merged=True)
    assert chat_once(trained, "Shout the words apple river.", temperature=0, max_new_tokens=8).new_tokens > 0
    with pytest.raises(QloraKitError, match=r"no trained adapter in .*; only the merged model is left .*: "
                                            r"`qlora-kit chat --merged"):
        load_trained_model(run)


def test_chat_merged_without_anything_trained_says_train_first(finished_run, tmp_path):
    import shutil

    from qlora_kit.evaluate import load_trained_model

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(finished_run / "recipe.yaml", run / "recipe.yaml")
    with pytest.raises(QloraKitError, match=r"no merged model in .*; train the recipe first"):
        load_trained_model(run, merged=True)


@pytest.mark.parametrize("name", ["extra.jsonl", "eval [v2].jsonl", "sub/extra.jsonl"])
def test_eval_data_is_read_relative_to_the_current_folder(name, finished_run, tmp_path, monkeypatch):
    from qlora_kit.evaluate import heldout_rows
    from qlora_kit.recipe import read_run_recipe

    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(json.dumps({"prompt": "Shout the words a b.", "completion": "A B"}) + "\n")
    monkeypatch.chdir(tmp_path)

    rows, described = heldout_rows(read_run_recipe(finished_run), name)

    assert len(rows) == 1 and described == name


def test_eval_reports_progress_with_the_time_left(finished_run, tmp_path, caplog):
    import logging
    import shutil

    from qlora_kit import evaluate

    run = shutil.copytree(finished_run, tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="qlora_kit"), pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate.Progress.__init__, "__defaults__", (0.0,))  # log every batch
        evaluate.evaluate_run(run, batch_size=4)

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval")]
    assert lines[0] == "eval: 8 rows, 8 batches of 4 for the adapter and the base"
    assert re.fullmatch(r"eval: 1/8 batches \(adapter loss\), about \d+s left", lines[1])
    assert re.fullmatch(r"eval: 8/8 batches \(base generation\), done in \d+s", lines[-1])


def test_progress_estimates_the_time_left_from_the_pace_so_far(monkeypatch, caplog):
    import logging

    from qlora_kit import evaluate

    clock = iter([0.0, 30.0, 60.0, 400.0])
    monkeypatch.setattr(evaluate.time, "monotonic", lambda: next(clock))
    progress = evaluate.Progress(10, "eval", every=0)
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        progress.step("adapter loss")
        progress.step("adapter loss")
    assert [r.getMessage() for r in caplog.records] == ["eval: 1/10 batches (adapter loss), about 4m30s left",
                                                        "eval: 2/10 batches (adapter loss), about 4m00s left"]


# A run folder damaged after training (a half copy, a full disk while syncing, a hand edit): what is broken, the
# command that reads it, and the fix its message must give. Each once was an internal error ("a bug in qlora-kit").
DAMAGED_RUNS = [
    ("adapter tokenizer gone", lambda run: [p.unlink() for p in (run / "adapter").glob("tokenizer*")],
     ["chat", "RUN", "--prompt", "hi"], r"adapter: cannot read the trained adapter's tokenizer .*copy .* again"),
    ("adapter weights truncated", lambda run: truncate(run / "adapter" / "adapter_model.safetensors"),
     ["eval", "RUN"], r"adapter: cannot read the trained adapter \(.*\); the run folder is damaged"),
    ("adapter weights gone", lambda run: (run / "adapter" / "adapter_model.safetensors").unlink(),
     ["chat", "RUN", "--prompt", "hi"], r"adapter: cannot read the trained adapter \("),
    ("adapter config not JSON", lambda run: (run / "adapter" / "adapter_config.json").write_text("{"),
     ["push", "RUN", "--repo-id", "u/n", "--base-model", "a/b", "--dry-run", "--out", "OUT"],
     r"adapter: cannot read the trained adapter \(Expecting"),
    ("adapter weights truncated, merge", lambda run: truncate(run / "adapter" / "adapter_model.safetensors"),
     ["merge", "RUN"], r"adapter: cannot read the trained adapter \(.*\); the run folder is damaged"),
    ("adapter config not JSON, LoRA GGUF", lambda run: (run / "adapter" / "adapter_config.json").write_text("{"),
     ["export", "RUN", "--format", "gguf-lora", "--out", "OUT.gguf"], r"adapter: cannot read the trained adapter \("),
    ("generation config not JSON", lambda run: (run / "adapter" / "generation_config.json").write_text("{"),
     ["eval", "RUN"], r"adapter: cannot read the trained adapter's generation config"),
    ("merged tokenizer gone", lambda run: [p.unlink() for p in (run / "merged").glob("tokenizer*")],
     ["export", "RUN", "--format", "gguf", "--out", "OUT.gguf"], r"merged: cannot read the merged model .*"
                                                                   r"`qlora-kit merge .*` writes it again"),
    ("merged config without model_type", lambda run: (run / "merged" / "config.json").write_text("{}"),
     ["chat", "RUN", "--merged", "--prompt", "hi"], r"merged: cannot read the merged model \(Unrecognized model"),
    ("merged weights truncated", lambda run: [truncate(p) for p in (run / "merged").glob("*.safetensors")],
     ["export", "RUN", "--format", "gguf", "--out", "OUT.gguf"], r"merged: cannot read the merged model \("),
    ("recipe not YAML", lambda run: (run / "recipe.yaml").write_text("model: [\n"),
     ["report", "RUN"], r"recipe.yaml: cannot read the run's recipe"),
    ("summary not JSON", lambda run: (run / "summary.json").write_text("{"),
     ["report", "RUN"], r"summary.json: cannot read it as JSON .*training writes it when it ends; .*move it away"),
    ("eval record not JSON", lambda run: (run / "eval.json").write_text("{"),
     ["push", "RUN", "--repo-id", "u/n", "--base-model", "a/b", "--dry-run", "--out", "OUT"],
     r"eval.json: cannot read it as JSON .*`qlora-kit eval RUN_DIR` writes it"),
]


@pytest.mark.parametrize(("damage", "command", "message"), [case[1:] for case in DAMAGED_RUNS],
                         ids=[case[0] for case in DAMAGED_RUNS])
def test_a_damaged_run_folder_is_named_with_its_fix_not_a_crash(damage, command, message, finished_run, tmp_path,
                                                                cli):
    import shutil

    run = shutil.copytree(finished_run, tmp_path / "run")
    damage(run)
    out = tmp_path / "upload"
    args = [str(run) if a == "RUN" else str(out) if a == "OUT" else str(tmp_path / "m.gguf") if a == "OUT.gguf"
            else a for a in command]
    status, _, err = cli(*args)
    assert status == 2, err
    assert re.search(message, err), err
    assert "bug in qlora-kit" not in err and not list(run.glob("qlora-kit-crash-*"))
    assert not out.exists() and not (tmp_path / "m.gguf").exists()  # nothing half-written left behind
    assert not [p for p in tmp_path.iterdir() if ".partial." in p.name]


def test_resume_without_a_checkpoint_never_retrains_over_a_trained_adapter(make_recipe, cli, tmp_path):
    """resume=auto with no checkpoint to resume from starts over, and that run's save would replace the adapter: a
    finished run whose checkpoints were deleted (to save disk), or whose every checkpoint is damaged, is refused in
    validate and train with the two ways on, and its adapter stays as it was."""
    import shutil

    recipe = make_recipe(training={"max_steps": 2, "save_steps": 1}, export={"merge": False})
    assert cli("train", str(recipe))[0] == 0
    run = tmp_path / "outputs" / "tiny"
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    checkpoints = sorted(p for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert len(checkpoints) == 2
    for checkpoint in checkpoints:  # damaged after they were saved
        (checkpoint / "trainer_state.json").write_text("{")

    status, _, err = cli("train", str(recipe), "training.resume=auto", "training.max_steps=4")
    assert status == 2
    assert "holds a trained adapter" in err and "the ones there were damaged and are moved aside" in err
    assert "training.overwrite=true to start over" in err
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith("checkpoint-") and "." not in p.name]

    shutil.rmtree(run / "checkpoints")  # deleted to save disk
    for command in ("validate", "train"):
        status, _, err = cli(command, str(recipe), "training.resume=auto", "training.max_steps=4")
        assert status == 2 and "none was saved, or they were deleted" in err, (command, err)
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert cli("train", str(recipe), "training.overwrite=true", "training.max_steps=1")[0] == 0  # the way on
