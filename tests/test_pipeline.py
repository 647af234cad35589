"""The full round trip on a tiny random Llama, on CPU: 4-bit NF4 train -> adapter -> merge, resume, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from qlora_kit.pipeline import run_training
from qlora_kit.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    recipe: Path
    run_dir: Path
    summary: dict


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def loss_steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, recipe_writer) -> Run:
    """One 4-step NF4 training of the tiny model, checkpointing every 2 steps and logging every 2."""
    folder = tmp_path_factory.mktemp("pipeline")
    recipe = recipe_writer(folder, "tiny", training={"max_steps": 4, "save_steps": 2, "logging_steps": 2,
                                                     "learning_rate": 1e-2})
    summary = run_training(load_recipe(recipe))
    return Run(recipe, folder / "outputs" / "tiny", summary)


def chat_inputs(tokenizer) -> dict[str, torch.Tensor]:
    prompts = ["Shout the words apple river.", "What is the capital of France?"]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(**inputs).logits[inputs["attention_mask"].bool()].float()


# --------------------------------------------------------------------------------------------- run folder


def test_training_writes_the_resolved_recipe_with_library_versions(trained_run):
    written = yaml.safe_load((trained_run.run_dir / "recipe.yaml").read_text())

    assert written["training"]["max_steps"] == 4
    assert written["quantization"]["quant_type"] == "nf4"
    assert written["versions"]["torch"] == torch.__version__
    assert {"transformers", "peft", "trl", "bitsandbytes", "accelerate"} <= set(written["versions"])


def test_training_saves_a_peft_adapter_with_tokenizer_and_stop_tokens(trained_run, tiny_tokenizer):
    adapter = trained_run.run_dir / "adapter"

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == 8
    linears = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {name.rsplit(".", 1)[-1] for name in config["target_modules"]} == linears  # all-linear, not lm_head
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer.json").is_file() and (adapter / "tokenizer_config.json").is_file()
    generation = json.loads((adapter / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_adapter_weights_are_saved_as_fp32_master_weights(trained_run):
    from safetensors.torch import load_file

    weights = load_file(trained_run.run_dir / "adapter" / "adapter_model.safetensors")

    assert weights and {t.dtype for t in weights.values()} == {torch.float32}
    assert any(t.abs().max() > 0 for name, t in weights.items() if "lora_B" in name)  # B starts at zero


def test_training_keeps_checkpoints_every_save_steps(trained_run):
    checkpoints = trained_run.run_dir / "checkpoints"

    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((checkpoints / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_metrics_log_has_a_loss_line_per_logging_step(trained_run):
    records = metrics(trained_run.run_dir)

    assert loss_steps(records) == [2, 4]
    assert all(r["loss"] > 0 for r in records if "loss" in r)


def test_summary_records_steps_loss_and_throughput(trained_run):
    summary = json.loads((trained_run.run_dir / "summary.json").read_text())

    assert summary == trained_run.summary
    assert summary["global_step"] == 4
    assert summary["train_loss"] > 0
    assert summary["train_tokens_per_second"] > 0
    assert len(summary["step_seconds"]) == summary["measured_steps"]  # one duration per measured step
    assert sum(summary["step_seconds"]) == pytest.approx(summary["seconds_per_step"] * summary["measured_steps"],
                                                         abs=1e-3)


def test_merge_writes_safetensors_and_a_passed_logits_check(trained_run):
    merged = trained_run.run_dir / "merged"

    assert (merged / "model.safetensors").is_file()
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    check = json.loads((merged / "merge_check.json").read_text())
    assert check["passed"] is True
    assert (check["dtype"], check["base"]) == ("fp32", "original")  # the recipe defaults: model.dtype auto on a CPU
    assert check["merge_rounding"]["max_abs_logit_diff"] < 1e-3
    assert check["merged_vs_trained"]["top1_agreement"] > 0.9
    assert not list(trained_run.run_dir.glob(".*partial"))


# ---------------------------------------------------------------------- the artefacts without qlora-kit


def test_adapter_loads_with_plain_peft_and_changes_the_model(trained_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = trained_run.run_dir / "adapter"
    inputs = chat_inputs(AutoTokenizer.from_pretrained(adapter))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_logits = logits(base, inputs)

    model = PeftModel.from_pretrained(base, adapter)

    assert (logits(model, inputs) - base_logits).abs().max() > 1e-2


def test_merged_model_matches_the_adapter_model(trained_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = trained_run.run_dir / "adapter"
    inputs = chat_inputs(AutoTokenizer.from_pretrained(trained_run.run_dir / "merged"))
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                             adapter)
    merged = AutoModelForCausalLM.from_pretrained(trained_run.run_dir / "merged", dtype=torch.float32)

    expected, actual = logits(with_adapter, inputs), logits(merged, inputs)

    assert torch.allclose(actual, expected, atol=1e-3, rtol=0)
    assert merged.config.vocab_size == with_adapter.config.vocab_size


# ------------------------------------------------------------------------------------------------- reuse


def test_training_again_into_the_same_run_folder_is_refused(trained_run):
    before = (trained_run.run_dir / "recipe.yaml").read_text()

    with pytest.raises(RecipeError) as caught:
        run_training(load_recipe(trained_run.recipe))

    assert "already exists" in str(caught.value)
    assert "training.resume=auto" in str(caught.value)
    assert (trained_run.run_dir / "recipe.yaml").read_text() == before


@dataclass
class Resumed:
    run_dir: Path
    first_session: list[dict]
    second_session: list[dict]
    summary: dict
    uninterrupted: list[dict]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, recipe_writer) -> Resumed:
    """4 steps, then the same recipe with resume=auto and 6 steps; plus an uninterrupted 6-step run to compare.

    A constant learning rate makes the two schedules identical, so the resumed curve must match step for step.
    """
    folder = tmp_path_factory.mktemp("resume")
    training = {"save_steps": 2, "logging_steps": 1, "lr_scheduler": "constant", "learning_rate": 1e-2}
    quick = {"merge": False}

    recipe_writer(folder, "resume", training={**training, "max_steps": 4}, export=quick)
    run_training(load_recipe(folder / "resume.yaml"))
    run_dir = folder / "outputs" / "resume"
    first = metrics(run_dir)
    recipe_writer(folder, "resume", training={**training, "max_steps": 6, "resume": "auto"}, export=quick)
    summary = run_training(load_recipe(folder / "resume.yaml"))
    second = metrics(run_dir)[len(first):]

    recipe_writer(folder, "straight", training={**training, "max_steps": 6}, export=quick)
    run_training(load_recipe(folder / "straight.yaml"))
    return Resumed(run_dir, first, second, summary, metrics(folder / "outputs" / "straight"))


def test_resume_auto_continues_from_the_last_checkpoint(resumed_run):
    assert loss_steps(resumed_run.first_session) == [1, 2, 3, 4]
    assert loss_steps(resumed_run.second_session) == [5, 6]
    assert resumed_run.summary["global_step"] == 6
    checkpoints = resumed_run.run_dir / "checkpoints"
    assert {"checkpoint-4", "checkpoint-6"} <= {p.name for p in checkpoints.glob("checkpoint-*")}


def test_resume_continues_the_same_loss_curve(resumed_run):
    resumed = {r["step"]: r["loss"] for r in resumed_run.first_session + resumed_run.second_session if "loss" in r}
    straight = {r["step"]: r["loss"] for r in resumed_run.uninterrupted if "loss" in r}

    assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4, 5, 6]
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], abs=1e-5), f"step {step}"


def test_resume_keeps_the_adapter_dtype(resumed_run):
    from safetensors.torch import load_file

    checkpoints = sorted((resumed_run.run_dir / "checkpoints").glob("checkpoint-*"))
    dtypes = {c.name: {str(t.dtype) for t in load_file(c / "adapter_model.safetensors").values()} for c in checkpoints}

    assert len(set().union(*dtypes.values())) == 1, dtypes


def test_resumed_summary_train_loss_is_an_average_of_logged_losses(resumed_run):
    losses = [r["loss"] for r in resumed_run.first_session + resumed_run.second_session if "loss" in r]

    assert min(losses) <= resumed_run.summary["train_loss"] <= max(losses)


def test_same_recipe_gives_the_same_adapter(make_recipe, tmp_path):
    from safetensors.torch import load_file

    adapters = []
    for name, unrelated_seed in [("first", 1), ("second", 2)]:
        torch.manual_seed(unrelated_seed)  # e.g. whatever the calling program did before
        run_training(load_recipe(make_recipe(name, training={"max_steps": 1}, export={"merge": False})))
        adapters.append(load_file(tmp_path / "outputs" / name / "adapter" / "adapter_model.safetensors"))

    first, second = adapters
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


# ---------------------------------------------------------------------------------------------------- CLI


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_accelerate_launch_train_py_trains_one_cpu_process(make_recipe, tmp_path):
    # `accelerate launch --num_processes 1 --cpu train.py RECIPE key=value`, run from the repository root.
    recipe = make_recipe("launched", training={"max_steps": 2})

    result = run_cli("-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
                     "train.py", str(recipe), "export.merge=false")

    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "launched"
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 2
    assert not (run_dir / "merged").exists()  # the override reached the recipe


@pytest.fixture
def cli(capsys):
    """Run `qlora-kit ARGS` in this process: (exit status, stdout, stderr). Restores the logger main() configures."""
    import logging

    from qlora_kit.cli import main

    logger = logging.getLogger("qlora_kit")
    saved = logger.handlers[:], logger.level, logger.propagate

    def invoke(*args: str) -> tuple[int, str, str]:
        status = main(list(args))
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    yield invoke
    logger.handlers[:], logger.level, logger.propagate = saved


def test_validate_reports_a_bad_recipe_in_one_paragraph_without_traceback(make_recipe):
    recipe = make_recipe("bad", lora={"rank": 8})

    result = run_cli("-m", "qlora_kit", "validate", str(recipe))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"qlora-kit: error: {recipe}: lora.rank: unknown key (did you mean 'lora.r'?)"]


def test_validate_accepts_a_good_recipe(make_recipe, cli):
    status, out, err = cli("validate", str(make_recipe()))

    assert status == 0, err
    assert "valid (40 training rows" in out


def test_validate_reports_a_bad_override_with_exit_status_2(make_recipe, cli):
    status, _, err = cli("validate", str(make_recipe()), "lora.r=0")

    assert status == 2
    assert "lora.r: 0 is out of range; it must be >= 1" in err
    assert "Traceback" not in err


def test_merge_on_a_folder_that_is_not_a_run_exits_2(tmp_path, cli):
    status, _, err = cli("merge", str(tmp_path))

    assert status == 2
    assert err.startswith(f"qlora-kit: error: {tmp_path}: not a qlora-kit run folder (no recipe.yaml)")


def test_an_eval_forward_on_cpu_leaves_4bit_layers_trainable(make_recipe, tiny_model_dir):
    """The before-training evaluation (and eval loss between steps) runs the model in eval mode. bitsandbytes then
    repacks CPU 4-bit weights for its AVX512-BF16 inference kernel, which has no backward: without a guard, every
    later training step would stop the gradient at each 4-bit layer. Gradients must be the same with or without it."""
    from qlora_kit.model import build_quantized_model
    from qlora_kit.recipe import load_recipe

    recipe = load_recipe(make_recipe(training={"gradient_checkpointing": False}))
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))

    def adapter_gradients(evaluate_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_quantized_model(recipe, str(tiny_model_dir), torch.float32)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    plain, after_eval = adapter_gradients(False), adapter_gradients(True)
    assert plain.keys() == after_eval.keys()
    layer0_b = [name for name in plain if "layers.0." in name and "lora_B" in name]
    assert layer0_b and all(plain[name].abs().sum() > 0 for name in layer0_b)  # gradient reaches the first layer
    for name in plain:
        torch.testing.assert_close(after_eval[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("upcast", [True, False])
def test_upcast_to_fp32_decides_the_dtype_of_norms_and_embeddings(make_recipe, tiny_model_dir, upcast):
    """peft's prepare_model_for_kbit_training keeps norms, embeddings and head in fp32 (an fp32 residual stream);
    quantization.upcast_to_fp32=false leaves them in the compute dtype. Either way the adapters train."""
    from qlora_kit.model import build_quantized_model
    from qlora_kit.recipe import load_recipe

    recipe = load_recipe(make_recipe(quantization={"compute_dtype": "bf16", "upcast_to_fp32": upcast}))
    model = build_quantized_model(recipe, str(tiny_model_dir), torch.bfloat16)
    base = model.get_base_model()
    expected = torch.float32 if upcast else torch.bfloat16
    assert base.model.norm.weight.dtype == expected
    assert base.model.embed_tokens.weight.dtype == expected
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    first_layer_b = [p.grad for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n]
    assert first_layer_b and all(g is not None and g.abs().sum() > 0 for g in first_layer_b)


@pytest.mark.parametrize(("shape", "kernel", "says"), [
    ("tiny-gemma-2", "sdpa", "does not support an attention implementation through torch.nn.functional"),
    ("tiny", "flash_attention_2", "FlashAttention2 has been toggled on"),
])
def test_an_attention_kernel_the_model_or_machine_lacks_is_a_recipe_error_before_weights_load(
        shape, kernel, says, make_recipe, family_model_dir, cli, capsys, monkeypatch):
    """transformers refuses Gemma 2 with sdpa, and flash_attention_2 without flash-attn, when it builds the model:
    validate, data and train say so with the key and the fix, exit 2, and load no weights."""
    import importlib.util

    if kernel == "flash_attention_2" and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    recipe = make_recipe(model={"name": str(family_model_dir(shape)), "attn_implementation": kernel})
    capsys.readouterr()  # the model folder's build progress
    import transformers
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("weights loaded")))
    for command in ("validate", "data", "train"):
        status, _, err = cli(command, str(recipe))
        assert status == 2, err
        *before, error = err.strip().splitlines()  # train first says it removed the run folder it had made
        assert before == ([] if command != "train" else [before[0]]) and "removed what this run wrote" in "".join(
            before or ["removed what this run wrote"])
        assert f"qlora-kit: error: {recipe}: model.attn_implementation: '{kernel}' cannot run this model here" in error
        assert says in error and "set model.attn_implementation: eager" in error
