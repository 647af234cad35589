"""Preference methods (dpo, orpo, kto, simpo): each trains, resumes, and computes trl's own loss on the same batch
with every speed lever on; rows and recipes that cannot train fail with messages that say why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import WORDS, write_jsonl

from qlora_kit.pipeline import run_training
from qlora_kit.recipe import RecipeError, load_recipe

METHODS = ("dpo", "orpo", "kto", "simpo")


def shout_pairs() -> list[dict]:
    """The shout task as preferences: capitals chosen, the same words in lower case rejected."""
    rows = []
    for i in range(40):
        first, second = WORDS[i % 10], WORDS[(i % 10 + i // 10 + 1) % 10]
        rows.append({"prompt": f"Shout the words {first} {second}.", "chosen": f"{first} {second}".upper(),
                     "rejected": f"{first} {second}"})
    return rows


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "shout_pairs.jsonl", shout_pairs())


def method_sections(method: str, pairs_file: Path, **training) -> dict:
    return {"method": method, "data": {"datasets": [{"path": str(pairs_file)}], "cache": False},
            "training": {"max_steps": 2, "save_steps": 100, "lr_scheduler": "constant", "warmup": 0, **training},
            "export": {"merge": False, "report": False}}


def losses_by_step(run_dir: Path) -> dict[int, float]:
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


# Per method, what the method logs besides the loss: the curves the report draws.
METHOD_METRICS = {"dpo": "rewards/margins", "orpo": "rewards/margins", "simpo": "rewards/margins",
                  "kto": "rewards/chosen"}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_two_steps_and_a_resumed_run_continues_the_same_curve(method, make_recipe, pairs_file):
    reference = load_recipe(make_recipe(f"{method}-straight", **method_sections(method, pairs_file, max_steps=3)))
    summary = run_training(reference)
    assert summary["global_step"] == 3
    assert (reference.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not (reference.run_dir / "adapter" / "ref").exists()  # trl's reference copy is never saved as adapter
    records = [json.loads(line) for line in (reference.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(METHOD_METRICS[method] in record for record in records)
    expected = losses_by_step(reference.run_dir)

    path = make_recipe(f"{method}-split", **method_sections(method, pairs_file, save_steps=2))
    run_training(load_recipe(path))
    assert (load_recipe(path).run_dir / "checkpoints" / "checkpoint-2").is_dir()
    resumed = load_recipe(path, ["training.max_steps=3", "training.resume=auto"])
    assert run_training(resumed)["global_step"] == 3
    losses = losses_by_step(resumed.run_dir)
    assert sorted(losses) == [1, 2, 3]
    assert [losses[s] for s in (1, 2, 3)] == pytest.approx([expected[s] for s in (1, 2, 3)], rel=1e-5)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


# ------------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize(("method", "section", "message"), [
    ("sft", {"beta": 0.2}, "preference.beta: applies to method dpo / orpo / simpo / kto only; this recipe trains "
                           "with method: sft (set `method: dpo` to train with it)"),
    ("dpo", {"gamma": 1.0}, "preference.gamma: applies to method simpo only; this recipe trains with method: dpo"),
    ("orpo", {"desirable_weight": 2.0}, "preference.desirable_weight: applies to method kto only"),
    ("kto", {"loss_type": "sigmoid"}, "preference.loss_type: 'sigmoid' is not a kto loss"),
    ("dpo", {"loss_type": "sigmod"}, "'sigmod' is not a dpo loss; did you mean 'sigmoid'?"),
    ("dpo", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "preference.loss_weights: 1 weights for 2"),
    ("dpo", {"config_args": {"beta": 0.3}}, "preference.config_args.beta: set by qlora-kit; use preference.beta"),
    ("kto", {"config_args": {"precompute_ref_logps": True}},
     "preference.config_args.precompute_ref_logps: not a KTOConfig argument (did you mean 'precompute_ref_log_probs'"),
])
def test_a_preference_key_for_another_method_or_a_wrong_value_names_the_method(method, section, message, make_recipe,
                                                                              pairs_file):
    sections = method_sections(method, pairs_file)
    with pytest.raises(RecipeError, match="preference") as caught:
        load_recipe(make_recipe(**sections, preference=section))
    assert message in str(caught.value)


@pytest.mark.parametrize(("training", "data", "message"), [
    ({"packing": True}, {}, "training.packing: applies to method sft only"),
    ({"sft_args": {"neftune_noise_alpha": 5}}, {}, "training.sft_args: applies to method sft only; pass extra trl "
                                                   "arguments for method dpo as preference.config_args"),
    ({}, {"loss_on": "all"}, "data.loss_on: applies to method sft only"),
])
def test_sft_only_settings_are_refused_for_a_preference_method(training, data, message, make_recipe, pairs_file):
    sections = method_sections("dpo", pairs_file, **training)
    sections["data"].update(data)
    with pytest.raises(RecipeError) as caught:
        load_recipe(make_recipe(**sections))
    assert message in str(caught.value)
