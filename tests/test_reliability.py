"""Nothing is lost: killed runs resume on the same loss curve, partial checkpoints are skipped, signals save first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_kit.cli import main
from qlora_kit.pipeline import run_training
from qlora_kit.recipe import QloraKitError, RecipeError, load_recipe
from qlora_kit.rundir import COMPLETE_MARKER, checkpoint_is_complete, find_resume_checkpoint

REPO = Path(__file__).resolve().parents[1]

# Long enough that a kill lands mid-run; every step logged and every second step checkpointed.
RESUMABLE = {"training": {"max_steps": 24, "save_steps": 2, "logging_steps": 1, "save_total_limit": None,
                          "learning_rate": 1e-3},
             "quantization": {"load_in_4bit": False}, "export": {"merge": False}, "data": {"cache": False}}


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """Per-step training loss from metrics.jsonl; a resumed run's later lines win."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def start_training(recipe_path: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qlora_kit", "train", str(recipe_path), *overrides], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(condition, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"training ended before the condition held:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("timed out waiting for training")
        time.sleep(0.02)


def kill_after_checkpoint(recipe_path: Path, step: int, last_step: int, timeout: float = 240) -> None:
    """Train `recipe_path` in a child process and SIGKILL it once checkpoint-`step` is complete, before the run's
    last step: a machine lost mid-run."""
    checkpoints = load_recipe(recipe_path).run_dir / "checkpoints"
    process = start_training(recipe_path)
    wait_for(lambda: (checkpoints / f"checkpoint-{step}" / COMPLETE_MARKER).exists(), process, timeout)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed_at = max(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*") if "." not in p.name)
    assert killed_at < last_step, "the kill must land before the run finished"


def test_a_run_killed_with_sigkill_resumes_on_the_same_loss_curve(make_recipe):
    reference = load_recipe(make_recipe("reference", **RESUMABLE))
    run_training(reference)
    expected = losses_by_step(reference.run_dir)

    path = make_recipe("killed", **RESUMABLE)
    kill_after_checkpoint(path, step=6, last_step=24)

    assert main(["train", str(path), "training.resume=auto"]) == 0
    resumed = losses_by_step(load_recipe(path).run_dir)
    assert sorted(resumed) == list(range(1, 25))
    assert [resumed[s] for s in range(1, 25)] == [expected[s] for s in range(1, 25)]  # identical on CPU


def test_an_incomplete_checkpoint_is_skipped_with_a_warning_never_loaded(make_recipe, caplog):
    recipe = load_recipe(make_recipe("partial", **{**RESUMABLE, "training": {**RESUMABLE["training"],
                                                                              "max_steps": 4}}))
    run_training(recipe)
    checkpoints = recipe.run_dir / "checkpoints"
    assert checkpoint_is_complete(checkpoints / "checkpoint-4")
    # A run killed while writing checkpoint-6: weights half written, no trainer state.
    partial = checkpoints / "checkpoint-6"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    assert not checkpoint_is_complete(partial)

    resume = load_recipe(make_recipe("partial", **{**RESUMABLE, "training": {**RESUMABLE["training"],
                                                                              "max_steps": 4, "resume": "auto"}}))
    with caplog.at_level("WARNING", logger="qlora_kit"):
        chosen = find_resume_checkpoint(resume, resume.run_dir)
    assert chosen == str(checkpoints / "checkpoint-4")
    assert "checkpoint-6 is incomplete" in caplog.text
    assert not partial.exists() and list(checkpoints.glob("checkpoint-6.incomplete-*"))


def test_sigterm_saves_a_checkpoint_then_exits_with_how_to_resume(make_recipe):
    path = make_recipe("terminated", **{**RESUMABLE, "training": {**RESUMABLE["training"], "max_steps": 400,
                                                                   "save_steps": 1000}})
    run_dir = load_recipe(path).run_dir
    process = start_training(path)
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(losses_by_step(run_dir)) >= 3, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "stopped by SIGTERM at step" in stderr and "training.resume=auto" in stderr
    (checkpoint,) = (run_dir / "checkpoints").glob("checkpoint-*")
    assert checkpoint_is_complete(checkpoint)
    assert not (run_dir / "adapter").exists()  # an interrupted run is not a finished one


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(make_recipe, monkeypatch):
    from trl import SFTTrainer

    compute_loss = SFTTrainer.compute_loss

    def diverging_after_step_5(self, *args, **kwargs):  # what a too-high learning rate does to fp16 runs
        loss = compute_loss(self, *args, **kwargs)
        return loss * float("nan") if self.state.global_step >= 5 else loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", diverging_after_step_5)
    recipe = load_recipe(make_recipe("diverges", training={"max_steps": 30, "save_steps": 2, "logging_steps": 1},
                                     quantization={"load_in_4bit": False}, export={"merge": False},
                                     data={"cache": False}))
    with pytest.raises(QloraKitError, match=r"loss became NaN/inf by step 6; .*Last good checkpoint: .*checkpoint-4"):
        run_training(recipe)
    saved = sorted(p.name for p in (recipe.run_dir / "checkpoints").glob("checkpoint-*"))
    assert saved == ["checkpoint-2", "checkpoint-4"]  # step 6 diverged and was not checkpointed
    assert not (recipe.run_dir / "adapter").exists()


def test_a_save_the_disk_cannot_hold_is_refused_before_writing(make_recipe, monkeypatch):
    import shutil as real_shutil

    from qlora_kit import trainers as train

    full = real_shutil._ntuple_diskusage(total=10 << 30, used=(10 << 30) - (1 << 20), free=1 << 20)
    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: full)
    recipe = load_recipe(make_recipe("full-disk", training={"save_steps": 2}, export={"merge": False}))
    with pytest.raises(QloraKitError, match=r"not enough disk space to save the checkpoint of step 2: .* 1 MiB free"):
        run_training(recipe)
    assert not recipe.run_dir.exists()  # nothing saved, so nothing left for the next run to trip over


def test_save_total_limit_keeps_only_complete_checkpoints(make_recipe):
    recipe = load_recipe(make_recipe("limited", training={"max_steps": 6, "save_steps": 2, "save_total_limit": 1},
                                     export={"merge": False}, data={"cache": False}))
    run_training(recipe)
    (only,) = (recipe.run_dir / "checkpoints").glob("checkpoint-*")
    assert only.name == "checkpoint-6" and checkpoint_is_complete(only)


def test_a_run_that_fails_before_saving_leaves_no_folder_behind(make_recipe):
    failing = load_recipe(make_recipe("retry", training={"max_length": 8}, data={"overlong": "drop"}))
    with pytest.raises(QloraKitError, match="no rows left"):
        run_training(failing)
    assert not failing.run_dir.exists()
    fixed = load_recipe(make_recipe("retry", export={"merge": False}))
    run_training(fixed)  # no "run folder already exists"
    assert (fixed.run_dir / "adapter" / "adapter_config.json").is_file()


def test_an_existing_run_is_never_overwritten_silently(make_recipe):
    path = make_recipe("twice", export={"merge": False})
    run_training(load_recipe(path))
    with pytest.raises(RecipeError, match=r"already exists. Continue it with training.resume=auto, replace it with "
                                          r"training.overwrite=true"):
        run_training(load_recipe(path))


def test_the_hub_token_never_reaches_the_run_folder_or_logs(make_recipe, monkeypatch, capfd):
    secret = "hf_qloraKitTestSecret0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    recipe = load_recipe(make_recipe("secret", export={"merge": True}))
    run_training(recipe)
    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err
    for path in recipe.run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_an_adapter_file_without_weights_is_refused_not_published(tmp_path):
    """A save that wrote no LoRA tensors (seen with FSDP's full-state-dict path) must fail, not look like success."""
    import torch
    from safetensors.torch import save_file

    from qlora_kit.trainers import check_adapter_not_empty

    folder = tmp_path / "run" / ".adapter.partial"
    folder.mkdir(parents=True)
    save_file({}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(QloraKitError, match="wrote no LoRA weights"):
        check_adapter_not_empty(folder)

    save_file({"base_model.model.q_proj.lora_A.weight": torch.zeros(2, 4)}, str(folder / "adapter_model.safetensors"))
    check_adapter_not_empty(folder)  # one tensor is enough


def test_adapter_tensors_finds_every_lora_weight_by_walking_modules(tiny_model_dir, make_recipe):
    """The FSDP save path walks modules (gathered FSDP weights are not Parameters); on a plain model it must find
    exactly the adapter entries of peft's own state dict, under the same names and with the same values."""
    import torch
    from peft import get_peft_model_state_dict

    from qlora_kit.model import build_quantized_model
    from qlora_kit.trainers import adapter_tensors

    recipe = load_recipe(make_recipe(lora={"r": 4, "alpha": 8, "use_dora": True}))
    model = build_quantized_model(recipe, str(tiny_model_dir), torch.float32)
    found = adapter_tensors(model)
    expected = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert found.keys() == expected.keys()
    assert all(torch.equal(found[k], expected[k].cpu()) for k in expected)
    assert get_peft_model_state_dict(model, state_dict=found).keys() == get_peft_model_state_dict(model).keys()


def test_fsdp_adapter_writer_matches_peft_save_pretrained(tiny_model_dir, make_recipe, tmp_path):
    """The FSDP path writes the adapter from gathered tensors; on a plain model its files must be exactly what
    PeftModel.save_pretrained writes (same keys incl. DoRA magnitudes, same values, loadable by plain peft)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qlora_kit.model import build_quantized_model
    from qlora_kit.trainers import adapter_tensors, write_peft_adapter

    recipe = load_recipe(make_recipe(lora={"r": 4, "alpha": 8, "use_dora": True}))
    model = build_quantized_model(recipe, str(tiny_model_dir), torch.float32)
    model.save_pretrained(str(tmp_path / "peft"))
    write_peft_adapter(model, adapter_tensors(model), tmp_path / "ours")

    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and any("lora_magnitude_vector" in k for k in ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    PeftModel.from_pretrained(base, str(tmp_path / "ours"))  # loads without missing/unexpected-key errors
