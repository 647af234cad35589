"""method: grpo: rewards named in the recipe, checked before weights load and while training; trl's GRPOTrainer on
the tiny NF4 model, resumable, with the speed levers computing trl's own loss and gradients."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import nonzero_lora_b, shout_conversations, write_jsonl

from qlora_kit.data import DataError, build_datasets
from qlora_kit.recipe import QloraKitError, RecipeError, load_recipe
from qlora_kit.rewards import ROW_COLUMN, build_rewards


@pytest.fixture(scope="session")
def shout_prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shout task as GRPO rows: a string prompt or a turn list, and the reference answer in `answer`."""
    rows = []
    for i, (user, assistant) in enumerate(shout_conversations()):
        prompt = user["content"] if i % 2 else [user]
        rows.append({"prompt": prompt, "answer": assistant["content"]})
    return write_jsonl(tmp_path_factory.mktemp("grpo") / "shout_prompts.jsonl", rows)


# length varies between completions (a learning signal from step one); exact_match reads the `answer` column
REWARDS = [{"name": "length", "target": 4, "max": 40, "weight": 1.0},
           {"name": "exact_match", "column": "answer", "weight": 2.0}]


@pytest.fixture
def grpo_recipe(make_recipe, shout_prompts):
    """`grpo_recipe(name, **sections)`: the tiny model on the shout prompts, method grpo, 2 prompts x 4 completions
    of up to 12 tokens per step."""

    def write(name: str = "grpo", **sections):
        grpo = {"rewards": REWARDS, "num_generations": 4, "max_completion_length": 12, "max_prompt_length": 128,
                **sections.pop("grpo", {})}
        data = {"datasets": [{"path": str(shout_prompts)}], "cache": False, **sections.pop("data", {})}
        training = {"batch_size": 8, "max_steps": 2, "learning_rate": 1e-2, **sections.pop("training", {})}
        return make_recipe(name, method="grpo", grpo=grpo, data=data, training=training,
                           export={"merge": False, "report": False, **sections.pop("export", {})}, **sections)

    return write


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- recipe checks


def check_before_weights(recipe) -> int:
    """What `qlora-kit validate` and `train` run on the recipe before any weight loads: reading the rows, which
    resolves the rewards first."""
    from qlora_kit.data import training_rows

    return training_rows(recipe)


def test_an_unknown_builtin_reward_suggests_the_closest_name(grpo_recipe):
    with pytest.raises(RecipeError, match=r"grpo.rewards\[0\].name: unknown built-in reward 'json_vaild' \(did you "
                                          r"mean 'json_valid'\?\)"):
        check_before_weights(load_recipe(grpo_recipe(grpo={"rewards": [{"name": "json_vaild"}]})))


@pytest.mark.parametrize(("function", "message"), [
    ("no_such_module_here:score", r"no module named 'no_such_module_here'"),
    ("json:no_such_function", r"json has no function 'no_such_function'"),
    ("missing.py:score", r"file not found: .*missing.py \(a relative path is read from the recipe file's folder\)"),
    ("score", r"'score' is not module:function or path/to/file.py:function"),
])
def test_a_reward_function_that_cannot_be_found_fails_before_weights_load(grpo_recipe, function, message):
    with pytest.raises(RecipeError, match=r"grpo.rewards\[0\].function: " + message):
        check_before_weights(load_recipe(grpo_recipe(grpo={"rewards": [{"function": function}]})))


def test_a_reward_file_is_read_relative_to_the_recipe_and_must_take_kwargs(grpo_recipe, tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "def strict(prompts, completions):\n    return [0.0] * len(completions)\n\n"
        "def shouty(prompts, completions, answer, **kwargs):\n    return [float(c[0]['content'].isupper()) for c in "
        "completions]\n")
    with pytest.raises(RecipeError, match=r"my_rewards.py:strict must accept \*\*kwargs"):
        check_before_weights(load_recipe(grpo_recipe(grpo={"rewards": [{"function": "my_rewards.py:strict"}]})))
    recipe = load_recipe(grpo_recipe(grpo={"rewards": [{"function": "my_rewards.py:shouty"}]}))
    (reward,) = build_rewards(recipe)
    assert reward.__name__ == "shouty" and reward.columns == ("answer",)


def test_a_setting_a_builtin_does_not_take_is_refused(grpo_recipe):
    with pytest.raises(RecipeError, match=r"grpo.rewards\[0\].pattern: not a setting of the json_valid reward \(it "
                                          r"takes keys\)"):
        check_before_weights(load_recipe(grpo_recipe(grpo={"rewards": [{"name": "json_valid", "pattern": "x"}]})))
    with pytest.raises(RecipeError, match=r"the json_equal reward needs `column`"):
        check_before_weights(load_recipe(grpo_recipe(grpo={"rewards": [{"name": "json_equal"}]})))
    with pytest.raises(RecipeError, match=r"pattern: not a valid regular expression"):
        check_before_weights(load_recipe(grpo_recipe(grpo={"rewards": [{"name": "regex", "pattern": "("}]})))


def test_grpo_settings_under_another_method_name_their_method(make_recipe):
    with pytest.raises(RecipeError, match=r"grpo: applies to method grpo only; this recipe trains with method: sft"):
        load_recipe(make_recipe(grpo={"num_generations": 4}))


def test_sft_only_settings_under_grpo_are_refused(grpo_recipe):
    with pytest.raises(RecipeError, match=r"training.packing: applies to method sft only"):
        load_recipe(grpo_recipe(training={"packing": True}))
    with pytest.raises(RecipeError, match=r"preference.beta: applies to method dpo / orpo / simpo / kto only; this "
                                          r"recipe trains with method: grpo"):
        load_recipe(grpo_recipe(preference={"beta": 0.1}))
    with pytest.raises(RecipeError, match=r"evaluation.metric: exact_match compares with a reference assistant turn"):
        load_recipe(grpo_recipe(data={"validation": 4}, evaluation={"metric": "exact_match"}))


def test_a_step_must_hold_whole_groups_of_completions(grpo_recipe):
    with pytest.raises(RecipeError, match=r"batch_size x gradient_accumulation_steps = 6 completions per optimizer "
                                          r"step must be a multiple of num_generations \(4\)"):
        load_recipe(grpo_recipe(training={"batch_size": 6}))


def test_a_row_missing_the_column_a_reward_reads_is_a_file_line_error(grpo_recipe, tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "Shout the words apple river.", "answer": "APPLE"},
                                                 {"prompt": "Shout the words stone cloud."}])
    recipe = load_recipe(grpo_recipe(data={"datasets": [{"path": str(path)}]}))
    with pytest.raises(DataError, match=r"rows.jsonl: line 2: missing column 'answer', which reward exact_match "
                                        r"reads"):
        build_datasets(recipe, tiny_tokenizer)


def test_prompts_become_conversations_with_their_columns_and_row(grpo_recipe, shout_prompts, tiny_tokenizer):
    data = {"system_prompt": "Answer in capitals.", "validation": 4}
    everything = build_datasets(load_recipe(grpo_recipe(data=data, grpo={"max_prompt_length": None})), tiny_tokenizer)
    median = everything.stats["train"]["lengths"][18]
    recipe = load_recipe(grpo_recipe(data=data, grpo={"max_prompt_length": median}))
    data = build_datasets(recipe, tiny_tokenizer)
    rows = list(data.train) + data.eval_prompts
    first = next(r for r in rows if r[ROW_COLUMN].endswith("line 1"))
    assert first["prompt"] == [{"role": "system", "content": "Answer in capitals."},
                               {"role": "user", "content": "Shout the words apple river."}]
    assert first["answer"] == "APPLE RIVER" and first[ROW_COLUMN] == f"{shout_prompts}: line 1"
    assert len(data.eval_prompts) == 4
    lengths = data.stats["train"]["lengths"]
    assert data.stats["train"]["dropped_too_long"] == sum(n > median for n in lengths) > 0


# ----------------------------------------------------------------------------------------- rewards at work


def call(reward, completions: list[str], **columns):
    rows = [f"data.jsonl: line {i + 1}" for i in range(len(completions))]
    chat = [[{"role": "assistant", "content": c}] for c in completions]
    ids = [list(range(len(c))) for c in completions]
    return reward(prompts=[[{"role": "user", "content": "q"}]] * len(completions), completions=chat,
                  completion_ids=ids, **{ROW_COLUMN: rows}, **columns)


def rewards_of(grpo_recipe, *specs):
    return build_rewards(load_recipe(grpo_recipe(grpo={"rewards": list(specs)})))


def test_builtin_rewards_score_completions(grpo_recipe):
    valid, equal, exact, regex, length = rewards_of(
        grpo_recipe, {"name": "json_valid", "keys": ["name", "age"]}, {"name": "json_equal", "column": "ref"},
        {"name": "exact_match", "column": "ref"}, {"name": "regex", "pattern": r"^\{.*\}$"},
        {"name": "length", "target": 10, "max": 20})
    completions = ['{"age": 3, "name": "A"}', '{"name": "A"}', "[1]", "not json " * 3]
    refs = ['{"name": "A", "age": 3}', '{"name": "B"}', "[1]", "x"]
    assert call(valid, completions) == [1.0, 0.5, 0.0, 0.0]
    assert call(equal, completions, ref=refs) == [1.0, 0.0, 1.0, 0.0]
    assert call(exact, completions, ref=refs) == [0.0, 0.0, 1.0, 0.0]
    assert call(regex, completions) == [1.0, 1.0, 0.0, 0.0]
    assert call(length, completions) == [-1.0, -0.3, 0.0, -1.0]


def test_a_reward_that_raises_names_the_function_and_the_row(grpo_recipe, tmp_path):
    (tmp_path / "bad.py").write_text(
        "def picky(prompts, completions, **kwargs):\n"
        "    return [1.0 / len(c[0]['content']) for c in completions]\n")
    (reward,) = rewards_of(grpo_recipe, {"function": "bad.py:picky"})
    with pytest.raises(QloraKitError, match=r"^reward bad.py:picky raised ZeroDivisionError: float division by zero on "
                                            r"data.jsonl: line 2 \(completion ''\)$"):
        call(reward, ["ok", "", "fine"])


@pytest.mark.parametrize(("body", "message"), [
    ("return [1.0]", r"returned 1 values for 3 completions \(data.jsonl: line 1, data.jsonl: line 2, data.jsonl: "
                     r"line 3\); a reward returns a list with one number per completion"),
    ("return 1.0", r"returned float for 3 completions"),
    ("return [1.0, float('nan'), 0.0]", r"returned nan for data.jsonl: line 2 \(completion 'b'\); every reward "
                                        r"must be a finite number"),
    ("return [1.0, None, 0.0]", r"returned None for data.jsonl: line 2"),
    ("return ['1', 2, 3]", r"returned '1' for data.jsonl: line 1"),
])
def test_a_reward_returning_the_wrong_shape_or_values_stops_with_one_message(grpo_recipe, tmp_path, body, message):
    (tmp_path / "odd.py").write_text(f"def odd(prompts, completions, **kwargs):\n    {body}\n")
    (reward,) = rewards_of(grpo_recipe, {"function": "odd.py:odd"})
    with pytest.raises(QloraKitError, match=r"^reward odd.py:odd " + message):
        call(reward, ["a", "b", "c"])


# ------------------------------------------------------------------------------------------------ training


def test_grpo_trains_two_steps_and_reports_its_reward_curves(grpo_recipe, monkeypatch):
    """Two steps of 2 prompts x 4 completions: each step samples its 8 completions in one `generate` call with the
    KV cache; rewards, their spread, each reward and completion lengths are logged and plotted."""
    from transformers import GenerationMixin

    from qlora_kit.pipeline import run_training
    from qlora_kit.report import write_report

    calls = []
    generate = GenerationMixin.generate

    def recording_generate(self, *args, **kwargs):
        config = kwargs.get("generation_config") or self.generation_config
        sampled = bool(kwargs.get("do_sample", config.do_sample))
        calls.append((kwargs["input_ids"].shape[0], config.use_cache is not False, sampled))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recording_generate)
    recipe = load_recipe(grpo_recipe(data={"validation": 4}, evaluation={"metric": "reward", "max_samples": 4,
                                                                       "max_new_tokens": 12}))
    summary = run_training(recipe)
    # held-out prompts before (greedy), one sampled call of 8 completions per step, held-out prompts after
    assert calls == [(4, True, False), (8, True, True), (8, True, True), (4, True, False)]
    logged = [r for r in read_metrics(recipe.run_dir) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2] and summary["global_step"] == 2
    for record in logged:
        for key in ("reward", "reward_std", "rewards/length/mean", "rewards/exact_match/mean",
                    "completions/mean_length"):
            assert math.isfinite(record[key]), key
    assert any(r["reward_std"] > 0 for r in logged)  # length differs between completions: a learning signal
    assert (recipe.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    generation = summary["generation"]
    assert generation["before"]["metric"] == "reward" and generation["before"]["rows"] == 4
    assert set(generation["after"]["per_reward"]) == {"length", "exact_match"}
    report = write_report(recipe.run_dir)
    plots = {p.name for p in report.glob("*.png")}
    assert {"grpo_reward.png", "grpo_reward_functions.png", "grpo_completion_length.png"} <= plots


def test_grpo_killed_with_sigkill_resumes_on_the_same_curve(grpo_recipe):
    """A GRPO run SIGKILLed after its first checkpoint, resumed with resume=auto: every step samples, scores and
    trains exactly as an uninterrupted run does (the sampler, the sampling RNG and the optimizer all come back)."""

    from test_reliability import kill_after_checkpoint

    from qlora_kit.cli import main
    from qlora_kit.pipeline import run_training

    sections = {"grpo": {"max_completion_length": 6},
                "training": {"save_steps": 1, "lr_scheduler": "constant", "logging_steps": 1, "max_steps": 3,
                             "save_total_limit": None}}
    straight = load_recipe(grpo_recipe("straight", **sections))
    run_training(straight)
    path = grpo_recipe("killed", **sections)
    kill_after_checkpoint(path, step=1, last_step=3)
    assert main(["train", str(path), "training.resume=auto"]) == 0

    def curve(run_dir):
        return {r["step"]: (r["loss"], r["reward"], r["completions/mean_length"])
                for r in read_metrics(run_dir) if "loss" in r}

    again, expected = curve(load_recipe(path).run_dir), curve(straight.run_dir)
    assert sorted(again) == [1, 2, 3]
    for step in (1, 2, 3):
        assert again[step] == pytest.approx(expected[step], abs=1e-5), step


def test_a_reward_error_in_training_stops_the_run_with_the_row(grpo_recipe, tmp_path, shout_prompts):
    from qlora_kit.pipeline import run_training

    (tmp_path / "boom.py").write_text(
        "def boom(prompts, completions, answer, **kwargs):\n"
        "    return [1 / 0 if ' ' in a else 0.0 for a in answer]\n")
    recipe = load_recipe(grpo_recipe(grpo={"rewards": [{"function": "boom.py:boom"}], "max_completion_length": 4}))
    with pytest.raises(QloraKitError, match=r"reward boom.py:boom raised ZeroDivisionError: division by zero on "
                                            + str(shout_prompts) + r": line \d+ "):
        run_training(recipe)


def test_grpo_loss_and_gradients_with_the_speed_levers_match_plain_trl_on_the_same_batch(grpo_recipe, tiny_model_dir,
                                                                                        tiny_tokenizer, tmp_path):
    """One generation batch, sampled (seeded) and scored by qlora-kit's trainer with fused LoRA and MLP, reentrant
    checkpointing and one layer keeping its activations; trl's own loss, every LoRA gradient and the no-grad scoring
    pass (reference log-probs, KL beta > 0) on that batch equal plain trl's GRPOTrainer on peft's path."""
    from trl import GRPOTrainer

    from qlora_kit.model import build_quantized_model
    from qlora_kit.speed import Machine, decide_speed_plan
    from qlora_kit.speed.checkpointing import reentrant_checkpoint
    from qlora_kit.speed.patches import keep_adapter_weights_in_fp32
    from qlora_kit.trainers import build_config, build_trainer

    recipe = load_recipe(grpo_recipe(grpo={"beta": 0.04}, training={"gradient_checkpointing": True},
                                     speed={"reentrant_checkpointing": True, "keep_activations_layers": 1}))
    data, rewards = build_datasets(recipe, tiny_tokenizer), build_rewards(recipe)

    def model():
        torch.manual_seed(0)
        return nonzero_lora_b(build_quantized_model(recipe, str(tiny_model_dir), torch.float32), 0.05)

    ours_model = model()
    plan = decide_speed_plan(recipe, ours_model.config, Machine.measure(), ours_model.get_nb_trainable_parameters()[0])
    ours = build_trainer(recipe, ours_model, tiny_tokenizer, data, tmp_path / "ours", torch.float32, plan)
    ours.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as train()
    ours.callback_handler.on_train_begin(ours.args, ours.state, ours.control)  # speed levers, checkpoint settings
    plain_model = model()
    before_trl = {n: p.detach().clone() for n, p in plain_model.named_parameters() if p.requires_grad}
    plain = GRPOTrainer(model=plain_model, reward_funcs=rewards,
                        args=build_config(recipe, tmp_path / "plain", torch.float32, has_eval=False, plan=plan),
                        train_dataset=data.train, processing_class=tiny_tokenizer)
    keep_adapter_weights_in_fp32(plain.model, before_trl)  # trl casts quantized models' adapters to bf16
    plain.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert any(hasattr(m, "_peft_forward") for m in ours.model.modules())
    assert not any(hasattr(m, "_peft_forward") for m in plain.model.modules())

    layers = ours.model.base_model.model.model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]  # the last one keeps its activations
    torch.manual_seed(0)
    batch = ours._generate_and_score_completions(next(iter(ours.get_train_dataloader())))
    assert batch["completion_mask"].sum() > 0 and batch["advantages"].abs().sum() > 0

    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    width = batch["completion_ids"].size(1)
    with torch.no_grad():
        scored = [t._get_per_token_logps_and_entropies(t.model, ids, mask, width)[0] for t in (plain, ours)]
    torch.testing.assert_close(scored[1], scored[0], rtol=1e-5, atol=1e-5)

    def loss_and_gradients(trainer):
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    (loss_plain, grads_plain), (loss_ours, grads_ours) = loss_and_gradients(plain), loss_and_gradients(ours)
    # trl switched checkpointing off and on around generation; the loss ran with the recipe's settings again
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    assert layers[0]._gradient_checkpointing_func is reentrant_checkpoint
    torch.testing.assert_close(loss_ours, loss_plain, rtol=1e-5, atol=1e-6)
    assert grads_plain.keys() == grads_ours.keys() and len(grads_plain) == 28  # A and B of 14 LoRA layers
    for name in grads_plain:
        torch.testing.assert_close(grads_ours[name], grads_plain[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(g.abs().sum() > 0 for g in grads_ours.values())


# ---------------------------------------------------------------------------- sampling on merged weights


def adapted_tiny_model(recipe, folder: Path, compute_dtype: torch.dtype = torch.float32):
    """The recipe's 4-bit model with LoRA, lora_B random (a fresh B = 0 would make any merge look right), in train
    mode as trl samples."""
    from qlora_kit.model import build_quantized_model

    torch.manual_seed(0)
    return nonzero_lora_b(build_quantized_model(recipe, str(folder), compute_dtype), 0.05).train()


def lora_layers(model) -> list[torch.nn.Module]:
    from peft.tuners.lora.bnb import Linear4bit

    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def prompts_and_mask(rows: int = 4, length: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts as trl builds them: row i has i pad tokens (id 0) on the left."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 200, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(rows):
        ids[row, :row], mask[row, :row] = 0, 0
    return ids, mask


@pytest.mark.parametrize(("forward", "compute_dtype", "atol"), [
    pytest.param("peft", torch.float32, 1e-5, id="peft-fp32"),
    pytest.param("fused", torch.float32, 1e-5, id="fused-fp32"),
    pytest.param("peft", torch.bfloat16, 3e-2, id="peft-bf16")])
def test_sampling_on_merged_weights_gives_peft_s_greedy_tokens_and_logits(grpo_recipe, tiny_model_dir, forward,
                                                                          compute_dtype, atol):
    """Under merged_lora_weights every LoRA layer computes dequantize(W4) + s B A in one matmul: the logits of peft's
    path (or of the fused LoRA forward the speed plan binds) within `atol` (compute dtype's rounding; the logits are
    ~0.7 at most) and the same greedy tokens; the adapter moves the logits by far more than that."""
    from qlora_kit.speed.generation import merged_lora_weights
    from qlora_kit.speed.patches import use_fused_lora

    model = adapted_tiny_model(load_recipe(grpo_recipe()), tiny_model_dir, compute_dtype)
    if forward == "fused":
        assert use_fused_lora(model) == 14
    ids, mask = prompts_and_mask()

    def logits_and_greedy_tokens():
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                    pad_token_id=0)
        return logits, tokens

    logits, tokens = logits_and_greedy_tokens()
    with merged_lora_weights(model) as merged:
        merged_logits, merged_tokens = logits_and_greedy_tokens()
    assert merged.merged == 14 and not merged.left and merged.copy_bytes > 0
    torch.testing.assert_close(merged_logits, logits, atol=atol, rtol=0)
    assert torch.equal(merged_tokens, tokens)
    with model.disable_adapter(), torch.no_grad():
        base_logits = model(input_ids=ids, attention_mask=mask).logits.float()
    assert (base_logits - logits).abs().max() > 10 * atol  # the test sees the adapter


@pytest.mark.parametrize("forward", ["peft", "fused"])
def test_merged_sampling_restores_every_forward_and_frees_the_copies_also_when_generate_raises(
        grpo_recipe, tiny_model_dir, forward):
    import weakref

    from qlora_kit.speed.generation import merged_lora_weights
    from qlora_kit.speed.patches import use_fused_lora

    model = adapted_tiny_model(load_recipe(grpo_recipe()), tiny_model_dir)
    if forward == "fused":
        use_fused_lora(model)
    layers = lora_layers(model)
    before = [layer.__dict__.get("forward") for layer in layers]
    ids, mask = prompts_and_mask()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits

    copies = []
    for fail in (False, True):
        with pytest.raises(IndexError) if fail else contextlib.nullcontext(), merged_lora_weights(model):
            copies += [weakref.ref(layer.forward) for layer in layers]  # each copy lives in its layer's forward
            assert all(layer.__dict__.get("forward") is not own for layer, own in zip(layers, before, strict=True))
            with torch.no_grad():
                model.generate(input_ids=ids + (10_000 if fail else 0), attention_mask=mask, max_new_tokens=2,
                               do_sample=False, pad_token_id=0)  # ids beyond the vocabulary: the embedding raises
        assert [layer.__dict__.get("forward") for layer in layers] == before
        assert all(copy() is None for copy in copies)  # freed: nothing holds a merged forward or its weight
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)


def test_layers_a_merged_weight_cannot_reproduce_keep_their_own_forward(grpo_recipe, family_model_dir):
    """A disabled adapter, LoRA dropout acting in train mode, several active adapters: those layers stay on peft's
    path and compute exactly what they did. In eval mode dropout does nothing, so the layers merge; a base bias (Qwen
    2.5's q/k/v) is added as bitsandbytes adds it; the unquantized lm_head is never touched."""
    from peft import LoraConfig

    from qlora_kit.speed.generation import merged_lora_weights

    folder = family_model_dir("tiny-qwen2.5")
    recipe = load_recipe(grpo_recipe(lora={"dropout": 0.1}, model={"name": str(folder)}))
    model = adapted_tiny_model(recipe, folder)
    ids, mask = prompts_and_mask()
    lora = lora_layers(model)
    assert any(layer.get_base_layer().bias is not None for layer in lora)
    with merged_lora_weights(model) as merged:
        assert merged.merged == 0 and merged.left == {"LoRA dropout in train mode": len(lora)}
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        with merged_lora_weights(model) as merged:
            got = model(input_ids=ids, attention_mask=mask).logits
        assert merged.merged == len(lora)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        with model.disable_adapter(), merged_lora_weights(model) as merged:
            assert merged.merged == 0 and merged.left == {"adapters disabled": len(lora)}
    assert "forward" not in model.get_output_embeddings().__dict__
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "other"])
    with merged_lora_weights(model) as merged:  # peft lists both as active in every layer
        assert merged.merged == 0 and merged.left == {"several active adapters": len(lora)}


def grpo_plan(grpo_recipe, machine, config=None, **sections):
    """The speed plan of a GRPO recipe on `machine` (the tiny model's config, or `config`)."""
    from transformers import AutoConfig

    from qlora_kit.speed import decide_speed_plan

    recipe = load_recipe(grpo_recipe(**sections))
    return decide_speed_plan(recipe, config or AutoConfig.from_pretrained(recipe.model.name), machine, 42_000_000)


def test_generation_weights_auto_merges_on_a_gpu_where_the_copies_fit_and_keeps_nf4_otherwise(grpo_recipe):
    from transformers import LlamaConfig

    from qlora_kit.speed import Machine

    def gpu(usable_gib: float = 78.0) -> Machine:
        return Machine(gpus=1, usable_gpu_gib=usable_gib, capability=(9, 0), processes=1, under_fsdp=False,
                       triton=True, liger=False)

    llama_8b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256)
    big = {"grpo": {"num_generations": 8, "max_completion_length": 128, "max_prompt_length": 256},
           "training": {"batch_size": 8, "gradient_accumulation_steps": 8}}
    plan = grpo_plan(grpo_recipe, gpu(), llama_8b, **big)
    assert plan.generation_weights == "bf16"
    (note,) = [n for n in plan.notes if n.startswith("generation_weights:")]
    assert note.startswith("generation_weights: auto -> bf16 (estimated peak while sampling") and "13.0 GiB" in note
    assert grpo_plan(grpo_recipe, gpu(12.0), llama_8b, **big).generation_weights == "nf4"  # 8B NF4 + 13 GiB: no room
    assert grpo_plan(grpo_recipe, gpu(), llama_8b, speed={"memory": 12}, **big).generation_weights == "nf4"
    least = grpo_plan(grpo_recipe, gpu(), speed={"memory": "least"})
    assert least.generation_weights == "nf4" and "generation_weights: auto -> nf4 (speed.memory: least; the " \
        "copies would add to the peak)" in least.notes
    cpu = grpo_plan(grpo_recipe, Machine.measure())
    assert cpu.generation_weights == "nf4" and any(n.startswith("generation_weights: auto -> nf4 (CPU") for n in
                                                   cpu.notes)
    assert "  generation_weights: nf4" in cpu.describe().splitlines()
    dropout = grpo_plan(grpo_recipe, gpu(), lora={"dropout": 0.05})
    assert dropout.generation_weights == "nf4" and any("lora.dropout 0.05" in n for n in dropout.notes)
    assert grpo_plan(grpo_recipe, Machine.measure(), speed={"generation_weights": "bf16"}).generation_weights == "bf16"


def test_generation_weights_bf16_is_refused_where_nothing_samples_on_mergeable_4bit_layers(grpo_recipe, make_recipe):
    with pytest.raises(RecipeError, match=r"speed.generation_weights: bf16 applies to method grpo only \(its "
                                          r"sampling\); method sft generates nothing while training"):
        load_recipe(make_recipe(speed={"generation_weights": "bf16"}))
    with pytest.raises(RecipeError, match=r"speed.generation_weights: bf16 merges the adapter into one weight, which "
                                          r"cannot apply lora.dropout \(0.05; trl samples in train mode"):
        load_recipe(grpo_recipe(lora={"dropout": 0.05}, speed={"generation_weights": "bf16"}))
    with pytest.raises(RecipeError, match=r"speed.generation_weights: bf16 copies 4-bit weights"):
        load_recipe(grpo_recipe(quantization={"load_in_4bit": False}, speed={"generation_weights": "bf16"}))
    assert load_recipe(make_recipe(speed={"generation_weights": "nf4"})).speed.generation_weights == "nf4"


def test_grpo_trains_two_steps_sampling_on_merged_weights(grpo_recipe, caplog, monkeypatch):
    """speed.generation_weights: bf16 end to end: the plan says so, every step's generate call runs on 14 merged
    layers (logged once, with the time it took to merge), and metrics.jsonl times the merge and the whole call.
    trl samples with the model in train mode: the mode the merged weights must match (no LoRA dropout)."""
    import logging

    from transformers import GenerationMixin

    from qlora_kit.pipeline import run_training

    modes = []
    generate = GenerationMixin.generate

    def recording_generate(self, *args, **kwargs):
        merged = sum(m.forward.__qualname__.startswith("merged_forward.") for m in lora_layers(self))
        modes.append((self.training, merged))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recording_generate)
    recipe = load_recipe(grpo_recipe(speed={"generation_weights": "bf16"}, training={"logging_steps": 1}))
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        summary = run_training(recipe)
    assert summary["global_step"] == 2 and summary["speed_plan"]["generation_weights"] == "bf16"
    messages = [r.getMessage() for r in caplog.records]
    (plan,) = [m for m in messages if m.startswith("speed plan:")]
    assert "  generation_weights: bf16" in plan.splitlines()
    merges = [m for m in messages if m.startswith("speed.generation_weights: bf16: 14 LoRA layers over 4-bit weights "
                                                  "merged into")]
    assert len(merges) == 1 and modes == [(True, 14), (True, 14)]
    logged = [r for r in read_metrics(recipe.run_dir) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2]
    for record in logged:
        assert math.isfinite(record["reward"]) and record["completions/mean_length"] > 0
        assert 0 < record["generation/merge_seconds"] < record["generation/seconds"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_on_merged_weights_on_a_gpu_gives_the_nf4_path_s_tokens_and_is_faster(grpo_recipe, tiny_model_dir,
                                                                                       tmp_path):
    """An 8-layer Llama (hidden 1024) in NF4 with a nonzero adapter on CUDA, sampled as trl does (train mode, 16
    left-padded prompts, greedy here). fp32 compute: the same greedy tokens on merged weights as on the 4-bit path
    (bf16's rounding could flip near-ties of a random model). bf16 compute with the speed plan's fused LoRA forward
    and Triton dequantize: the logits within bf16 rounding, a generate call on merged weights (merge included)
    faster than on the 4-bit layers, and every copy freed afterwards."""
    import shutil
    import time

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_kit.speed.generation import merged_lora_weights
    from qlora_kit.speed.patches import use_fused_lora

    folder = tmp_path / "llama-8-layers"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model_dir / name, folder / name)
    recipe = load_recipe(grpo_recipe(model={"name": str(folder)}))
    ids, mask = (t.cuda() for t in prompts_and_mask(rows=16, length=32))

    def generate(model, new_tokens: int) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    exact = adapted_tiny_model(recipe, folder, torch.float32)
    assert exact.device.type == "cuda"
    tokens = generate(exact, 32)
    with merged_lora_weights(exact) as merged:
        assert merged.merged == 56
        assert torch.equal(generate(exact, 32), tokens)
    del exact

    model = adapted_tiny_model(recipe, folder, torch.bfloat16)
    use_fused_lora(model)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        with merged_lora_weights(model):
            merged_logits = model(input_ids=ids, attention_mask=mask).logits.float()
    torch.testing.assert_close(merged_logits, logits, atol=0.05 * logits.abs().max().item(), rtol=0)

    def seconds(merging: bool) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with merged_lora_weights(model) if merging else contextlib.nullcontext():
            generate(model, 64)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    for merging in (False, True):
        seconds(merging)  # warm-up: kernels, allocator, cuBLAS workspaces
    allocated = torch.cuda.memory_allocated()
    nf4, bf16 = (sorted(seconds(merging) for _ in range(3))[1] for merging in (False, True))
    assert torch.cuda.memory_allocated() == allocated  # the copies are gone
    print(f"generate 16 x 64 tokens, 8-layer Llama (hidden 1024): nf4 {nf4:.3f} s, merged bf16 {bf16:.3f} s")
    assert bf16 < nf4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grpo_on_a_gpu_generates_and_trains_in_bf16_with_the_speed_levers(grpo_recipe):
    """The GPU path: bf16 compute, fused LoRA with the Triton dequantize kernel, checkpointing with one kept layer,
    sampling on merged bf16 copies (auto's choice where they fit); two steps generate on the GPU, log finite rewards
    and save an fp32 adapter."""
    from safetensors.torch import load_file

    from qlora_kit.pipeline import run_training

    recipe = load_recipe(grpo_recipe(training={"gradient_checkpointing": True},
                                     speed={"keep_activations_layers": 1}))
    summary = run_training(recipe)
    logged = [r for r in read_metrics(recipe.run_dir) if "loss" in r]
    assert summary["global_step"] == 2 and all(math.isfinite(r["reward"]) for r in logged)
    assert all(r["completions/mean_length"] > 0 for r in logged)
    assert summary["speed_plan"]["generation_weights"] == "bf16"
    assert all(0 < r["generation/merge_seconds"] < r["generation/seconds"] for r in logged)
    adapter = load_file(recipe.run_dir / "adapter" / "adapter_model.safetensors")
    assert {str(t.dtype) for t in adapter.values()} == {"torch.float32"}


@pytest.mark.slow
def test_the_grpo_quickstart_validates_and_its_rows_are_what_its_rewards_read(monkeypatch):
    """recipes/quickstart-grpo.yaml (paths relative to the repository root): its user reward loads from the file
    next to the recipe, reads the `answer` column every row has, and scores the reference answer itself 3 of 3."""
    from qlora_kit.data import training_rows

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    recipe = load_recipe("recipes/quickstart-grpo.yaml")
    assert training_rows(recipe) == 400
    valid, fields = build_rewards(recipe)
    assert fields.columns == ("answer",)
    row = json.loads((repo / "recipes/data/quickstart-grpo/held_out.jsonl").read_text().splitlines()[0])
    total = sum(r.weight * call(r, [row["answer"]], answer=[row["answer"]])[0] for r in (valid, fields))
    assert total == 3.0
