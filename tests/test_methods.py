"""Preference methods (dpo, orpo, kto, simpo): each trains, resumes, and computes trl's own loss on the same batch
with every speed lever on; rows and recipes that cannot train fail with messages that say why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import WORDS, write_jsonl
from test_reliability import losses_by_step

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


# Per method, what the method logs besides the loss: the curves the report draws.
METHOD_METRICS = {"dpo": "rewards/margins", "orpo": "rewards/margins", "simpo": "rewards/margins",
                  "kto": "rewards/chosen"}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_two_steps_then_resumes_from_its_checkpoint(method, make_recipe, pairs_file):
    """Two steps and a checkpoint, then a third step resumed from it (not a fresh start: steps 1-2 are not run
    again). That a resumed run continues the very same loss curve is the SIGKILL test's job (dpo) below."""
    path = make_recipe(method, **method_sections(method, pairs_file, save_steps=2))
    recipe = load_recipe(path)
    assert run_training(recipe)["global_step"] == 2
    assert (recipe.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not (recipe.run_dir / "adapter" / "ref").exists()  # trl's reference copy is never saved as the adapter
    records = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(METHOD_METRICS[method] in record for record in records)

    resumed = load_recipe(path, ["training.max_steps=3", "training.resume=auto"])
    assert run_training(resumed)["global_step"] == 3
    records = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)


@pytest.mark.parametrize("method", METHODS)
def test_tokens_seen_are_every_token_of_the_trained_sequences_so_tokens_per_second_is_real(method, make_recipe,
                                                                                          tmp_path):
    """One epoch of 4 pairs: tokens seen (metrics.jsonl) are exactly prompt + chosen and prompt + rejected of every
    pair (prompt + completion of every KTO row), the count qlora-kit's data step reports, and tokens/s is not 0
    (trl.experimental's ORPO / CPO batches have no input_ids, which transformers' own count reads)."""
    pairs = write_jsonl(tmp_path / "four_pairs.jsonl", shout_pairs()[:4])
    steps = 4 if method == "kto" else 2  # KTO trains each pair as a desirable and an undesirable row
    sections = method_sections(method, pairs, max_steps=steps, batch_size=2, logging_steps=1)
    recipe = load_recipe(make_recipe(method, **sections))
    summary = run_training(recipe)
    records = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    seen = [r["num_input_tokens_seen"] for r in records if "loss" in r]
    assert len(seen) == steps and seen == sorted(seen) and seen[0] > 0
    assert seen[-1] == summary["data"]["train"]["tokens"]
    assert summary["train_tokens_per_second"] > 0


# ------------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize(("method", "section", "message"), [
    ("sft", {"beta": 0.2}, "preference.beta: applies to method dpo / orpo / simpo / kto only; this recipe trains "
                           "with method: sft (set `method: dpo` to train with it)"),
    ("dpo", {"gamma": 1.0}, "preference.gamma: applies to method simpo only; this recipe trains with method: dpo"),
    ("orpo", {"desirable_weight": 2.0}, "preference.desirable_weight: applies to method kto only"),
    ("kto", {"loss_type": "sigmoid"}, "preference.loss_type: 'sigmoid' is not a kto loss"),
    ("dpo", {"loss_type": "sigmod"}, "'sigmod' is not a dpo loss (did you mean 'sigmoid'?)"),
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
    ({"pad_to_max_length": True}, {}, "training.pad_to_max_length: applies to method sft only; trl's dpo trainer "
                                      "pads each batch itself"),
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


# ------------------------------------------------------------------------------------------ same loss as trl


def conversational_rows(method: str) -> list[dict]:
    """The first pairs as trl's own trainers take them (conversations it renders and tokenizes itself)."""
    rows = []
    for pair in shout_pairs()[:8]:
        prompt = [{"role": "user", "content": pair["prompt"]}]
        answers = {side: [{"role": "assistant", "content": pair[side]}] for side in ("chosen", "rejected")}
        if method == "kto":
            rows += [{"prompt": prompt, "completion": answers["chosen"], "label": True},
                     {"prompt": prompt, "completion": answers["rejected"], "label": False}]
        else:
            rows.append({"prompt": prompt, **answers})
    return rows


def trl_trainer_class(method: str) -> type:
    import trl
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    return {"dpo": trl.DPOTrainer, "kto": trl.KTOTrainer, "orpo": ORPOTrainer, "simpo": CPOTrainer}[method]


def loss_and_adapter_gradients(trainer, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in trainer.model.named_parameters()
                           if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_computes_trl_s_own_loss_and_gradients_with_every_speed_lever_on(method, make_recipe, pairs_file,
                                                                                    tiny_model_dir, tiny_tokenizer,
                                                                                    tmp_path):
    """qlora-kit's trainer (its tokenization, fused LoRA and MLP, kept activations under checkpointing) against trl's
    unmodified trainer on peft's plain path (trl tokenizing the same conversations), on the same batch."""
    compare_with_plain_trl(method, make_recipe, pairs_file, tiny_model_dir, tiny_tokenizer, tmp_path, liger=False)


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_liger_kernels_keep_trl_s_loss_and_gradients_for_each_method_on_gpu(method, make_recipe, pairs_file,
                                                                            tiny_model_dir, tiny_tokenizer, tmp_path):
    """On a GPU the plan adds Liger's layer kernels (trl 1.16 keeps its own fused LM head for these methods): the
    loss and adapter gradients stay trl's plain ones (peft path, no Liger) up to fp32 kernel rounding. Liger swaps
    RoPE module-wide, so both sides use its RoPE; its RMSNorm and SwiGLU are on our side only."""
    compare_with_plain_trl(method, make_recipe, pairs_file, tiny_model_dir, tiny_tokenizer, tmp_path, liger=True)


def compare_with_plain_trl(method, make_recipe, pairs_file, tiny_model_dir, tiny_tokenizer, tmp_path,
                           liger: bool) -> None:
    import dataclasses

    from datasets import Dataset

    from qlora_kit.data import build_datasets
    from qlora_kit.model import build_quantized_model
    from qlora_kit.speed import Machine, decide_speed_plan
    from qlora_kit.speed.patches import keep_adapter_weights_in_fp32, modeling_module_restored
    from qlora_kit.trainers import build_config, build_trainer

    sections = method_sections(method, pairs_file, gradient_checkpointing=True, batch_size=4)
    recipe = load_recipe(make_recipe(**sections, speed={"keep_activations_layers": 1}))
    torch.manual_seed(0)
    model = build_quantized_model(recipe, str(tiny_model_dir), torch.float32)
    plan = decide_speed_plan(recipe, model.config, Machine.measure(), model.get_nb_trainable_parameters()[0])
    assert plan.liger_kernels == liger  # on a GPU run without liger-kernel installed this fails: install it
    with modeling_module_restored(model):
        ours = build_trainer(recipe, model, tiny_tokenizer, build_datasets(recipe, tiny_tokenizer),
                             tmp_path / "ours", torch.float32, plan)
        torch.manual_seed(0)
        plain_model = build_quantized_model(recipe, str(tiny_model_dir), torch.float32)
        trl_class = trl_trainer_class(method)
        before_trl = {name: p.detach().clone() for name, p in plain_model.named_parameters() if p.requires_grad}
        plain_args = build_config(recipe, tmp_path / "plain", torch.float32, False,
                                  dataclasses.replace(plan, liger_kernels=False))
        plain = trl_class(model=plain_model, args=plain_args,
                          train_dataset=Dataset.from_list(conversational_rows(method)), processing_class=tiny_tokenizer)
        keep_adapter_weights_in_fp32(plain.model, before_trl)  # trl casts a quantized model's adapter to bf16
        for trainer in (ours, plain):  # the reference is the base; the policy moves away from it
            torch.manual_seed(1)
            with torch.no_grad():
                for name, param in sorted(trainer.model.named_parameters()):
                    if "lora_B.default" in name:
                        param.normal_(0, 0.05)
        ours.model.gradient_checkpointing_enable(ours.args.gradient_checkpointing_kwargs)
        ours.callback_handler.on_train_begin(ours.args, ours.state, ours.control)  # speed levers, kept layer
        plain.model.gradient_checkpointing_enable(plain.args.gradient_checkpointing_kwargs)
        layers = ours.model.base_model.model.model.layers
        assert hasattr(layers[0].mlp.down_proj, "_peft_forward") and hasattr(layers[0].mlp, "_unfused_mlp_forward")

        batch = ours.data_collator([ours.train_dataset[i] for i in range(4)])
        if method in ("dpo", "kto"):  # the tokens trl's own tokenization makes of the same conversations
            # (trl.experimental's ORPO and CPO append an EOS after the template's end-of-turn marker; qlora-kit does
            # not)
            plain_batch = plain.data_collator([plain.train_dataset[i] for i in range(4)])
            assert torch.equal(batch["input_ids"], plain_batch["input_ids"])
        batch = ours._prepare_inputs(batch)  # onto the model's device

        policy_passes: list[bool] = []  # whether the last layer checkpointed, in each forward that builds a graph
        hook = layers[-1].register_forward_pre_hook(
            lambda module, args: policy_passes.append(module.gradient_checkpointing) if torch.is_grad_enabled()
            else None)
        ours_loss, ours_grads = loss_and_adapter_gradients(ours, batch)
        ours_loss_again, _ = loss_and_adapter_gradients(ours, batch)  # after trl's reference pass reset
        hook.remove()
        plain_loss, plain_grads = loss_and_adapter_gradients(plain, batch)

    assert policy_passes == [False, False]  # the last layer kept its activations in both policy forwards
    rtol = 1e-4 if liger else 1e-5
    assert ours_loss.item() == pytest.approx(plain_loss.item(), rel=rtol, abs=1e-6)
    assert ours_loss_again.item() == pytest.approx(ours_loss.item(), rel=1e-6)
    assert ours_grads.keys() == plain_grads.keys() and ours_grads
    for name, grad in ours_grads.items():
        assert grad.norm() > 0, name
        torch.testing.assert_close(grad, plain_grads[name], rtol=10 * rtol, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------------- data


def test_a_dpo_prompt_is_token_for_token_the_prompt_sft_trains_after(tiny_tokenizer):
    from qlora_kit.data import tokenize_conversation, tokenize_pair

    prompt = [{"role": "system", "content": "Answer in capitals."},
              {"role": "user", "content": "Shout the words apple river."},
              {"role": "assistant", "content": "APPLE RIVER"},
              {"role": "user", "content": "Shout the words stone cloud."}]
    chosen, rejected = [{"role": "assistant", "content": "STONE CLOUD"}], [{"role": "assistant", "content": "no"}]
    pair = tokenize_pair(tiny_tokenizer, {"prompt": prompt, "chosen": chosen, "rejected": rejected}, None)

    sft = tokenize_conversation(tiny_tokenizer, prompt + chosen, "completion")
    last_answer_start = len(sft["assistant_masks"]) - sft["assistant_masks"][::-1].index(0)
    assert pair["prompt_ids"] == sft["input_ids"][:last_answer_start]
    assert pair["prompt_ids"] + pair["chosen_ids"] == sft["input_ids"]  # the chosen answer is what SFT trains on
    assert tiny_tokenizer.decode(pair["rejected_ids"]).startswith("no")


def test_chosen_and_rejected_conversations_share_their_opening_turns_as_the_prompt(tmp_path):
    from qlora_kit.data import load_rows
    from qlora_kit.recipe import DatasetSource

    user = {"role": "user", "content": "Shout the words apple river."}
    path = write_jsonl(tmp_path / "ultrafeedback.jsonl", [
        {"chosen": [user, {"role": "assistant", "content": "APPLE RIVER"}],
         "rejected": [user, {"role": "assistant", "content": "apple river"}], "score_chosen": 9.0}])
    [row] = load_rows(DatasetSource(path=str(path)), "Be loud.", method="dpo")
    assert row == {"prompt": [{"role": "system", "content": "Be loud."}, user],
                   "chosen": [{"role": "assistant", "content": "APPLE RIVER"}],
                   "rejected": [{"role": "assistant", "content": "apple river"}]}


def test_fields_map_preference_columns(tmp_path):
    from qlora_kit.data import load_rows
    from qlora_kit.recipe import DatasetSource

    path = write_jsonl(tmp_path / "renamed.jsonl", [{"question": "Shout cat.", "good": "CAT", "bad": "cat"}])
    source = DatasetSource(path=str(path), fields={"prompt": "question", "chosen": "good", "rejected": "bad"})
    [row] = load_rows(source, None, method="orpo")
    assert row["chosen"] == [{"role": "assistant", "content": "CAT"}]


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "Shout cat.", "chosen": "CAT", "rejected": "CAT"}, "line 2: 'chosen' and 'rejected' are identical"),
    ({"prompt": "Shout cat.", "chosen": "  ", "rejected": "cat"}, "line 2: 'chosen' is empty"),
    ({"prompt": "Shout cat.", "chosen": "CAT"}, "line 2: missing field 'rejected'"),
    ({"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "CAT", "rejected": "cat"},
     "line 2: the prompt ends on a assistant turn"),
])
def test_a_bad_preference_row_stops_with_its_file_and_line_or_is_skipped_and_counted(row, message, tmp_path,
                                                                                    make_recipe, tiny_tokenizer):
    from qlora_kit.data import DataError, build_datasets

    path = write_jsonl(tmp_path / "pairs.jsonl", [shout_pairs()[0], row, *shout_pairs()[1:12]])
    sections = method_sections("dpo", path)
    with pytest.raises(DataError) as caught:
        build_datasets(load_recipe(make_recipe(**sections)), tiny_tokenizer)
    assert f"{path}: {message}" in str(caught.value)

    sections["data"]["on_bad_rows"] = "skip"
    data = build_datasets(load_recipe(make_recipe(**sections)), tiny_tokenizer)
    assert data.stats["skipped_bad_rows"]["count"] == 1 and data.stats["train"]["rows"] == 12


def test_kto_trains_on_unpaired_rows_and_on_pairs_split_into_desirable_and_undesirable(tmp_path, make_recipe,
                                                                                      tiny_tokenizer, pairs_file):
    from qlora_kit.data import build_datasets

    data = build_datasets(load_recipe(make_recipe(**method_sections("kto", pairs_file))), tiny_tokenizer)
    assert data.stats["train"]["rows"] == 80 and data.stats["train"]["desirable"] == 40
    assert set(data.train.column_names) == {"prompt_ids", "completion_ids", "label"}

    path = write_jsonl(tmp_path / "unpaired.jsonl", [{"prompt": "Shout cat.", "completion": "CAT", "label": True},
                                                     {"prompt": "Shout dog.", "completion": "dog", "label": "no"}])
    with pytest.raises(Exception, match=r"line 2: 'label' must be true \(desirable\) or false"):
        build_datasets(load_recipe(make_recipe(**method_sections("kto", path))), tiny_tokenizer)


def test_a_preference_method_refuses_sft_rows_and_sft_refuses_pairs(make_recipe, tiny_tokenizer, shout_files,
                                                                     pairs_file):
    from qlora_kit.data import DataError, build_datasets

    sections = method_sections("dpo", shout_files[0])
    with pytest.raises(DataError, match="method dpo trains on preference rows"):
        build_datasets(load_recipe(make_recipe(**sections)), tiny_tokenizer)
    sections = method_sections("sft", pairs_file)
    sections["data"]["datasets"][0]["format"] = "preference"
    with pytest.raises(DataError, match="format preference trains a preference method"):
        build_datasets(load_recipe(make_recipe(**sections)), tiny_tokenizer)


def test_the_dry_run_counts_pairs_shows_their_lengths_and_marks_the_scored_tokens(make_recipe, tiny_tokenizer,
                                                                                   pairs_file):
    from qlora_kit.data import build_datasets, describe_data

    recipe = load_recipe(make_recipe(**method_sections("dpo", pairs_file)), ["data.validation=8"])
    text = describe_data(build_datasets(recipe, tiny_tokenizer), tiny_tokenizer, recipe, color=False)
    assert "train pairs: 32; tokens prompt p50" in text and "validation pairs: 8" in text
    assert "chosen p50" in text and "rejected p50" in text
    assert "example 0, prompt + chosen (scored tokens inside ⟦ ⟧):" in text
    assert "⟦APPLE RIVER<|im_end|>\n⟧" in text  # the answer and its end of turn, never the prompt


# ------------------------------------------------------------------------------------------- model.adapter


def test_dpo_continues_an_sft_run_s_adapter_with_that_adapter_as_its_reference(make_recipe, pairs_file,
                                                                              finished_run):
    from safetensors.torch import load_file

    sections = method_sections("dpo", pairs_file, max_steps=1, logging_steps=1)
    recipe = load_recipe(make_recipe(**sections, model={"adapter": str(finished_run)}))
    run_training(recipe)
    [first] = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line]
    # the first step scores the policy before any update: identical to its reference, so DPO's loss is log 2
    assert first["loss"] == pytest.approx(0.693147, abs=1e-4) and first["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert not (recipe.run_dir / "adapter" / "ref").exists()  # trl's reference copy is not part of the adapter
    start = load_file(finished_run / "adapter" / "adapter_model.safetensors")
    trained = load_file(recipe.run_dir / "adapter" / "adapter_model.safetensors")
    assert start.keys() == trained.keys()
    assert any(not torch.equal(start[k], trained[k]) for k in start)


@pytest.mark.parametrize(("lora", "adapter", "message"), [
    ({"r": 16}, None, "lora.r: the starting adapter {adapter}/adapter has r=8, the recipe says 16; set lora.r: 8"),
    ({"target_modules": ["q_proj"]}, None, "lora.target_modules: the starting adapter"),
    ({}, "no-such-run", "model.adapter: no-such-run is not a folder here"),
])
def test_a_starting_adapter_that_is_missing_or_differs_from_the_lora_section_fails_before_weights_load(
        lora, adapter, message, make_recipe, pairs_file, finished_run):
    sections = method_sections("dpo", pairs_file)
    where = adapter or str(finished_run)
    with pytest.raises(RecipeError) as caught:
        load_recipe(make_recipe(**sections, model={"adapter": where}, lora=lora))
    assert message.format(adapter=finished_run) in str(caught.value)


def test_the_memory_estimate_counts_chosen_and_rejected_rows_for_pair_methods(make_recipe, pairs_file,
                                                                              tiny_model_dir):
    from transformers import AutoConfig

    from qlora_kit.memory import estimate_memory_for_config

    config = AutoConfig.from_pretrained(tiny_model_dir)
    sft = estimate_memory_for_config(load_recipe(make_recipe(training={"batch_size": 4})), config)
    dpo = load_recipe(make_recipe(**method_sections("dpo", pairs_file, batch_size=2)))
    assert estimate_memory_for_config(dpo, config)["total"] == pytest.approx(sft["total"])


def test_the_report_draws_the_reward_curves_of_a_preference_run(tmp_path):
    from qlora_kit.report import plot_metrics

    records = [{"step": s, "loss": 0.7 - 0.1 * s, "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s,
                "rewards/margins": 0.2 * s, "rewards/accuracies": 0.5 + 0.1 * s} for s in range(1, 5)]
    written = {path.name for path in plot_metrics(records, tmp_path)}
    assert {"loss.png", "rewards.png", "reward_accuracy.png"} <= written


def test_qlora_kit_eval_scores_a_preference_run_on_prompt_plus_chosen():
    from qlora_kit.data import reference_rows

    prompt = [{"role": "user", "content": "Shout cat."}]
    pair = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "CAT"}],
            "rejected": [{"role": "assistant", "content": "cat"}]}
    bad = {"prompt": prompt, "completion": [{"role": "assistant", "content": "cat"}], "label": False}
    assert reference_rows([pair, bad]) == [{"messages": prompt + [{"role": "assistant", "content": "CAT"}]}]


def test_a_dpo_run_killed_with_sigkill_resumes_on_the_same_loss_curve(make_recipe, pairs_file):

    from test_reliability import kill_after_checkpoint

    from qlora_kit.cli import main

    sections = method_sections("dpo", pairs_file, max_steps=12, save_steps=2, logging_steps=1,
                               save_total_limit=None)
    sections["quantization"] = {"load_in_4bit": False}
    reference = load_recipe(make_recipe("dpo-reference", **sections))
    run_training(reference)
    expected = losses_by_step(reference.run_dir)

    path = make_recipe("dpo-killed", **sections)
    kill_after_checkpoint(path, step=2, last_step=12, timeout=900)

    assert main(["train", str(path), "training.resume=auto"]) == 0
    resumed = losses_by_step(load_recipe(path).run_dir)
    assert sorted(resumed) == list(range(1, 13))
    assert [resumed[s] for s in range(1, 13)] == pytest.approx([expected[s] for s in range(1, 13)], rel=1e-6)


def test_a_run_continuing_an_adapter_resumes_after_sigkill_to_the_adapter_of_an_unkilled_run(make_recipe, pairs_file):
    """SFT, then DPO from its adapter (model.adapter), killed after a checkpoint and resumed: the resumed run starts
    from the checkpoint's weights (not the starting adapter applied again on top of them, nor the starting adapter
    alone), keeps the starting adapter as its reference, and ends with exactly the adapter of a run never killed."""

    from safetensors.torch import load_file
    from test_reliability import kill_after_checkpoint

    from qlora_kit.cli import main

    full_precision = {"quantization": {"load_in_4bit": False}, "export": {"merge": False, "report": False}}
    sft = load_recipe(make_recipe("sft-start", **full_precision,
                                  training={"max_steps": 3, "learning_rate": 1e-2}, data={"cache": False}))
    run_training(sft)
    start = load_file(sft.run_dir / "adapter" / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for k, t in start.items() if "lora_B" in k)  # a start that differs from the base

    sections = method_sections("dpo", pairs_file, max_steps=12, save_steps=2, logging_steps=1, save_total_limit=None,
                               learning_rate=1e-2)
    sections.update(full_precision, model={"adapter": str(sft.run_dir)})
    straight = load_recipe(make_recipe("dpo-straight", **sections))
    run_training(straight)
    expected = losses_by_step(straight.run_dir)
    assert expected[1] == pytest.approx(0.693147, abs=1e-4)  # the policy starts as its reference: the SFT adapter

    path = make_recipe("dpo-killed", **sections)
    kill_after_checkpoint(path, step=4, last_step=12, timeout=900)

    assert main(["train", str(path), "training.resume=auto"]) == 0
    killed = load_recipe(path)
    resumed = losses_by_step(killed.run_dir)
    assert sorted(resumed) == list(range(1, 13))
    # the first step after the checkpoint continues the curve: a policy re-started from the SFT adapter would score
    # log 2 again, and the SFT adapter added on top of the checkpoint's would move it elsewhere
    assert [resumed[s] for s in range(1, 13)] == pytest.approx([expected[s] for s in range(1, 13)], rel=1e-6)
    ours = load_file(killed.run_dir / "adapter" / "adapter_model.safetensors")
    theirs = load_file(straight.run_dir / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() == start.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-7, msg=name)
    assert any(not torch.equal(ours[name], start[name]) for name in start)


def test_the_longest_training_row_of_pairs_is_prompt_plus_the_longer_answer(make_recipe, pairs_file, tiny_tokenizer):
    from qlora_kit.data import build_datasets, longest_training_row

    recipe = load_recipe(make_recipe(**method_sections("dpo", pairs_file)), ["data.cache=false"])
    data = build_datasets(recipe, tiny_tokenizer)
    expected = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in data.train)
    assert longest_training_row(data, recipe) == expected < recipe.training.max_length


def test_the_longest_packed_pair_is_prompt_plus_both_answers_and_only_for_pair_methods(make_recipe, pairs_file,
                                                                                      tiny_tokenizer):
    """What speed.shared_prefix's packed rows hold at most: the memory estimate's decoder length for pairs."""
    from qlora_kit.data import build_datasets, longest_packed_pair

    recipe = load_recipe(make_recipe(**method_sections("orpo", pairs_file)), ["data.cache=false"])
    data = build_datasets(recipe, tiny_tokenizer)
    expected = max(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in data.train)
    assert longest_packed_pair(data, recipe) == expected
    kto = load_recipe(make_recipe(**method_sections("kto", pairs_file)), ["data.cache=false"])
    assert longest_packed_pair(build_datasets(kto, tiny_tokenizer), kto) is None


def test_the_dry_run_estimates_pair_memory_for_the_packed_pairs_the_speed_plan_uses(make_recipe, pairs_file, capsys,
                                                                                    tiny_tokenizer, monkeypatch):
    """speed.shared_prefix: true (dpo with sdpa): `qlora-kit data` estimates for the longest packed pair, the length
    the run's speed plan reads, and says so (auto too: the estimate is for a GPU run with sdpa, where auto shares);
    with shared_prefix false, for the two unpacked rows."""
    import qlora_kit.memory
    from qlora_kit.cli import main
    from qlora_kit.data import build_datasets, longest_packed_pair

    estimate, asked = qlora_kit.memory.estimate_memory_for_config, []

    def recorded(*args, **kwargs):  # the tiny model's packed and unpacked totals are equal to the printed 0.1 GiB
        asked.append(kwargs.get("packed_pair_row"))
        return estimate(*args, **kwargs)

    monkeypatch.setattr(qlora_kit.memory, "estimate_memory_for_config", recorded)
    sections = method_sections("dpo", pairs_file, gradient_checkpointing=True)
    recipe = load_recipe(make_recipe(**sections, speed={"shared_prefix": True}))
    packed = longest_packed_pair(build_datasets(recipe, tiny_tokenizer), recipe)
    assert main(["data", str(recipe.source)]) == 0
    assert f"pairs packed into rows up to {packed} tokens (speed.shared_prefix)" in capsys.readouterr().out
    assert main(["data", str(make_recipe("auto", **sections))]) == 0
    assert f"pairs packed into rows up to {packed} tokens (speed.shared_prefix)" in capsys.readouterr().out
    assert main(["data", str(make_recipe("unshared", **sections, speed={"shared_prefix": False}))]) == 0
    assert "packed" not in capsys.readouterr().out
    assert asked == [packed, packed, None]
