"""The run folder: only what qlora-kit created is ever replaced or removed, one run at a time, checkpoints are checked
before a resume trusts them, and a resume refuses a recipe its checkpoints do not fit."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qlora_kit.recipe import RecipeError, load_recipe
from qlora_kit.rundir import (
    COMPLETE_MARKER,
    RUN_MARKER,
    find_resume_checkpoint,
    mark_checkpoint_complete,
    open_run_folder,
    resume_command,
)


class Failed(Exception):
    pass


def start_and_fail(recipe) -> None:
    """What a run that fails before saving anything does to its folder (e.g. bad data found after the lock)."""
    with pytest.raises(Failed), open_run_folder(recipe):
        raise Failed


def saved_run(path: Path, *overrides: str) -> Path:
    """A run folder as a run that saved one checkpoint leaves it."""
    recipe = load_recipe(path, list(overrides))
    with open_run_folder(recipe) as run:
        run.begin(recipe)
        checkpoint = run.path / "checkpoints" / "checkpoint-2"
        checkpoint.mkdir(parents=True)
        (checkpoint / "adapter_model.safetensors").write_bytes(b"weights")
    return run.path


def test_a_new_run_gets_its_marker_at_once_and_its_recipe_when_training_begins(make_recipe, tmp_path):
    recipe = load_recipe(make_recipe("first"))
    with open_run_folder(recipe) as run:
        assert run.path == tmp_path / "outputs" / "first"
        assert (run.path / RUN_MARKER).is_file() and not (run.path / "recipe.yaml").exists()
        run.begin(recipe)
        (run.path / "adapter").mkdir()
    written = yaml.safe_load((run.path / "recipe.yaml").read_text())
    assert written["lora"]["r"] == 8
    assert {"torch", "transformers", "peft", "trl", "bitsandbytes"} <= set(written["versions"])


def test_an_existing_run_is_refused_without_resume_or_overwrite(make_recipe):
    path = make_recipe("again")
    saved_run(path)
    with pytest.raises(RecipeError) as caught, open_run_folder(load_recipe(path)):
        pass
    assert "already exists" in str(caught.value)
    assert "training.resume=auto" in str(caught.value) and "training.overwrite=true" in str(caught.value)


def test_resume_reuses_the_run_and_keeps_its_checkpoints(make_recipe):
    path = make_recipe("again")
    run_dir = saved_run(path)
    with open_run_folder(load_recipe(path, ["training.resume=auto"])) as run:
        assert run.path == run_dir
    assert (run_dir / "checkpoints" / "checkpoint-2").is_dir()


@pytest.mark.parametrize("setting", ["training.overwrite=true", "training.resume=auto"])
def test_a_folder_without_the_run_marker_is_never_replaced_or_written_into(make_recipe, tmp_path, setting):
    precious = tmp_path / "outputs" / "precious"
    precious.mkdir(parents=True)
    (precious / "thesis.tex").write_text("years of work")
    recipe = load_recipe(make_recipe("precious"), [setting])
    with pytest.raises(RecipeError, match="is not a qlora-kit run folder .* never replaces or writes into a folder "
                                          "it did not create"), open_run_folder(recipe):
        pass
    assert sorted(p.name for p in precious.iterdir()) == ["thesis.tex"]


def test_overwrite_keeps_the_earlier_run_until_the_new_one_has_saved_something(make_recipe):
    path = make_recipe("again")
    run_dir = saved_run(path)
    (run_dir / "notes.txt").write_text("earlier run")

    start_and_fail(load_recipe(path, ["training.overwrite=true"]))  # e.g. its data turned out to be bad
    assert (run_dir / "notes.txt").read_text() == "earlier run"  # back where it was
    assert (run_dir / "checkpoints" / "checkpoint-2").is_dir()
    assert [p.name for p in run_dir.parent.iterdir() if "replaced" in p.name] == []

    saved_run(path, "training.overwrite=true")
    assert not (run_dir / "notes.txt").exists()  # replaced only now that the new run saved a checkpoint
    assert [p.name for p in run_dir.parent.iterdir() if "replaced" in p.name] == []


def test_a_failed_resume_keeps_an_earlier_run_that_saved_nothing(make_recipe):
    path = make_recipe("nothing-saved")
    recipe = load_recipe(path)
    with open_run_folder(recipe) as run:  # an earlier run that ended before its first checkpoint
        run.begin(recipe)
        (run.path / "adapter").mkdir()
    (run.path / "adapter").rmdir()
    (run.path / "metrics.jsonl").write_text("{}\n")

    start_and_fail(load_recipe(path, ["training.resume=auto"]))
    assert (run.path / "metrics.jsonl").is_file() and (run.path / "recipe.yaml").is_file()


def test_a_new_run_that_fails_leaves_no_folder_and_an_empty_folder_stays_empty(make_recipe, tmp_path):
    new = load_recipe(make_recipe("new"))
    start_and_fail(new)
    assert not new.run_dir.exists()

    empty = tmp_path / "outputs" / "empty"
    empty.mkdir(parents=True)
    start_and_fail(load_recipe(make_recipe("empty")))
    assert empty.is_dir() and list(empty.iterdir()) == []


def test_a_second_run_with_the_same_name_is_refused_while_the_first_holds_the_lock(make_recipe):
    path = make_recipe("busy")
    resumed = load_recipe(path, ["training.resume=auto"])
    with open_run_folder(load_recipe(path)), pytest.raises(RecipeError) as caught, open_run_folder(resumed):
        pass
    message = str(caught.value)
    assert "is in use by a run that is still going" in message and "pid " in message and "host " in message
    assert "resume=auto" not in message and "overwrite=true" not in message


def test_a_stale_lock_from_a_killed_run_is_taken_over(make_recipe, tmp_path):
    path = make_recipe("stale")
    recipe = load_recipe(path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from qlora_kit.recipe import load_recipe; from qlora_kit.rundir import open_run_folder\n"
        f"with open_run_folder(load_recipe({str(path)!r})):\n    print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RecipeError, match="in use"), open_run_folder(load_recipe(path, ["training.resume=auto"])):
            pass
    finally:
        holder.kill()
        holder.wait()
    lock = recipe.run_dir.with_name(f".{recipe.run_dir.name}.lock")
    assert f"pid {holder.pid}" in lock.read_text()  # the dead owner's lock file is still there...
    with open_run_folder(load_recipe(path, ["training.resume=auto"])) as run:  # ...and is taken over
        assert run.path == recipe.run_dir


def checkpoint(run_dir: Path, step: int) -> Path:
    folder = run_dir / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 64)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    mark_checkpoint_complete(folder)
    return folder


def test_a_damaged_checkpoint_is_moved_aside_and_the_one_before_it_resumed(make_recipe, tmp_path, caplog):
    recipe = load_recipe(make_recipe("damaged"), ["training.resume=auto"])
    good, bad = checkpoint(recipe.run_dir, 2), checkpoint(recipe.run_dir, 4)
    with (bad / "adapter_model.safetensors").open("r+b") as handle:  # same size, one byte flipped
        handle.seek(10)
        handle.write(b"y")
    assert (bad / COMPLETE_MARKER).is_file()

    assert find_resume_checkpoint(recipe, recipe.run_dir) == str(good)
    assert not bad.exists()
    assert [p.name.split("-17")[0] for p in good.parent.iterdir() if p.name.startswith("checkpoint-4.")] == [
        "checkpoint-4.damaged"]
    assert "damaged (its files no longer match what was saved)" in caplog.text


def test_a_truncated_checkpoint_file_is_damaged_too(make_recipe):
    recipe = load_recipe(make_recipe("truncated"), ["training.resume=auto"])
    good, bad = checkpoint(recipe.run_dir, 2), checkpoint(recipe.run_dir, 4)
    (bad / "adapter_model.safetensors").write_bytes(b"x" * 10)
    assert find_resume_checkpoint(recipe, recipe.run_dir) == str(good)


def test_resume_refuses_changes_that_make_the_checkpoints_meaningless_and_lists_them(make_recipe):
    path = make_recipe("changed")
    saved_run(path)
    changed = load_recipe(path, ["training.resume=auto", "lora.r=16", "training.batch_size=2",
                                 "training.learning_rate=1e-5"])
    with pytest.raises(RecipeError) as caught, open_run_folder(changed):
        pass
    message = str(caught.value)
    assert "lora.r: 8 -> 16" in message and "training.batch_size: 4 -> 2" in message
    assert "learning_rate" not in message  # a new learning rate is a legitimate change on resume


def test_recipe_yaml_is_replaced_only_once_training_begins(make_recipe):
    path = make_recipe("resumed")
    run_dir = saved_run(path)
    before = (run_dir / "recipe.yaml").read_text()
    start_and_fail(load_recipe(path, ["training.resume=auto", "training.learning_rate=1e-5"]))
    assert (run_dir / "recipe.yaml").read_text() == before


def test_the_resume_command_can_be_pasted_as_is(make_recipe, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    folder = tmp_path / "my recipes"
    folder.mkdir()
    path = make_recipe("with space")
    moved = folder / "it's here.yaml"
    path.rename(moved)
    recipe = load_recipe(moved, ["data.system_prompt=Be brief; no prose.", "training.overwrite=true"])
    command = resume_command(recipe)
    assert shlex.split(command) == ["qlora-kit", "train", str(moved), "data.system_prompt=Be brief; no prose.",
                                    "training.resume=auto"]
    assert load_recipe(*[shlex.split(command)[2]], shlex.split(command)[3:]).data.system_prompt == "Be brief; no prose."


def test_the_resume_command_under_accelerate_names_the_launcher(make_recipe, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    command = resume_command(load_recipe(make_recipe("two")))
    assert command.startswith("accelerate launch --num_processes 2 train.py ")
    assert command.endswith(" training.resume=auto")


def test_runs_do_not_wait_for_each_other_when_their_names_differ(make_recipe):
    start = time.monotonic()
    with open_run_folder(load_recipe(make_recipe("one"))), open_run_folder(load_recipe(make_recipe("two"))):
        pass
    assert time.monotonic() - start < 30
