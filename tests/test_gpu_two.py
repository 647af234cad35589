"""Two GPUs: a killed DDP or FSDP-QLoRA run resumes on the loss curve of an uninterrupted one, and two "machines"
(the two GPUs of one host as machine ranks 0 and 1, rendezvous on localhost) train as one process would.
Run through the device tool on nvidia-h200-x2: `pytest -m gpu tests/test_gpu_two.py`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_gpu import chat_file, tiny_base, write_recipe  # noqa: F401  (fixtures shared with the one-GPU tests)
from test_reliability import losses_by_step as losses

from qlora_kit.rundir import COMPLETE_MARKER

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

ROOT = Path(__file__).resolve().parent.parent
# 16 steps, every step logged, every second one saved; bf16 on two GPUs: reductions may add in another order.
RESUMABLE = ["export.merge=false", "training.max_steps=16", "training.save_steps=2", "training.save_total_limit=null",
             "training.logging_steps=1", "training.batch_size=2", "data.cache=false"]
LAUNCH_EXTRA = {"ddp": [], "fsdp_qlora": ["quantization.quant_storage=bf16"]}
LOSS_TOLERANCE = {"ddp": 0.01, "fsdp_qlora": 0.02}  # relative, per step (FSDP keeps LoRA weights in bf16)


def launch(config: str, recipe: Path, *overrides: str, machine: int | None = None, port: int = 29517,
           wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    """`accelerate launch --config_file recipes/accelerate/CONFIG.yaml train.py RECIPE ...`; with `machine`, one of two
    machines of one process each (CUDA_VISIBLE_DEVICES picks its GPU), meeting on localhost."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes" / "accelerate" / f"{config}.yaml"), "--num_processes", "2"]
    env = {**os.environ, "QLORA_KIT_CACHE": str(recipe.parent / "cache")}
    if machine is not None:
        command += ["--num_machines", "2", "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1",
                    "--main_process_port", str(port)]
        env["CUDA_VISIBLE_DEVICES"] = str(machine)
    command += [str(ROOT / "train.py"), str(recipe), *overrides]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def assert_same_curve(expected: dict[int, float], actual: dict[int, float], tolerance: float) -> None:
    assert sorted(actual) == sorted(expected), (sorted(expected), sorted(actual))
    worst = max(abs(actual[s] - expected[s]) / expected[s] for s in expected)
    print(f"largest relative loss difference over {len(expected)} steps: {worst:.2e}")
    assert worst < tolerance, {s: (expected[s], actual[s]) for s in expected}


@pytest.mark.parametrize("config", ["ddp", "fsdp_qlora"])
def test_a_killed_two_gpu_run_resumes_on_the_loss_curve_of_an_uninterrupted_one(
        config: str, tmp_path: Path, tiny_base: Path, chat_file: Path) -> None:  # noqa: F811
    recipe = write_recipe(tmp_path, tiny_base, chat_file)
    overrides = [*RESUMABLE, *LAUNCH_EXTRA[config]]
    reference = launch(config, recipe, *overrides, "training.run_name=reference")
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    expected = losses(tmp_path / "outputs" / "reference")

    checkpoints = tmp_path / "outputs" / "killed" / "checkpoints"
    running = launch(config, recipe, *overrides, "training.run_name=killed", wait=False)
    deadline = time.monotonic() + 600
    while not (checkpoints / "checkpoint-6" / COMPLETE_MARKER).exists():
        assert running.poll() is None, running.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "timed out waiting for checkpoint-6"
        time.sleep(0.05)
    os.killpg(running.pid, signal.SIGKILL)  # the launcher and both ranks, as a lost node would
    running.wait(timeout=60)
    saved = [int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*") if "." not in p.name]
    assert max(saved) < 16, "the kill must land before the run finished"

    resumed = launch(config, recipe, *overrides, "training.run_name=killed", "training.resume=auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert_same_curve(expected, losses(tmp_path / "outputs" / "killed"), LOSS_TOLERANCE[config])


@pytest.mark.parametrize("config", ["ddp", "fsdp_qlora"])
def test_two_machines_of_one_gpu_each_train_as_one_process_would(
        config: str, tmp_path: Path, tiny_base: Path, chat_file: Path) -> None:  # noqa: F811
    """The multi-node launch the README documents (recipes/accelerate/multi_node.yaml, scripts/slurm_multi_node.sh),
    run as machine ranks 0 and 1 on localhost; the same global batch as one process with 2 accumulation steps."""
    recipe = write_recipe(tmp_path, tiny_base, chat_file)
    common = ["export.merge=false", "training.max_steps=8", "training.logging_steps=1", "data.cache=false",
              "training.batch_size=2", *LAUNCH_EXTRA[config]]
    single = subprocess.run([sys.executable, "-m", "qlora_kit", "train", str(recipe), *common,
                             "training.gradient_accumulation_steps=2", "training.run_name=single"], cwd=ROOT,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "0",
                                 "QLORA_KIT_CACHE": str(tmp_path / "cache")},
                            capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    port = 29600 + (config == "fsdp_qlora")
    machines = [launch(config, recipe, *common, "training.run_name=two-machines", machine=m, port=port, wait=False)
                for m in (0, 1)]
    outputs = [m.communicate(timeout=900)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert_same_curve(losses(tmp_path / "outputs" / "single"), losses(tmp_path / "outputs" / "two-machines"),
                      LOSS_TOLERANCE[config])
