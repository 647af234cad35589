"""The run folder: prepare it, write into it atomically, mark checkpoints complete, find the one to resume from.

Every file or folder qlora-kit publishes goes through `write_atomically` or `atomic_folder`: a reader (or a run
killed mid-write) sees the old version or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from qlora_kit.recipe import Recipe, RecipeError, recipe_to_dict

log = logging.getLogger("qlora_kit")

LIBRARIES = ("qlora-kit", "torch", "transformers", "accelerate", "bitsandbytes", "peft", "trl", "datasets")
COMPLETE_MARKER = "qlora_kit_complete.json"


# ------------------------------------------------------------------------------------------------ atomic writes


def write_atomically(path: Path, text: str) -> None:
    """Write next to `path`, fsync, rename: a reader sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(target: Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty hidden folder next to `target`; when the block ends without an error it becomes `target`.

    On an error the partial folder is removed and `target` is untouched. With `replace=False` an existing `target`
    (another process finished first, e.g. a shared cache entry) is kept and the new copy dropped."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial.", dir=target.parent))
    try:
        yield partial
        if target.exists() and not replace:
            shutil.rmtree(partial)
            return
        publish_dir(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def publish_dir(partial: Path, target: Path) -> None:
    """Move a fully written folder into place; an older `target` is swapped out first, then deleted."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(partial, target)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ run folder


def prepare_run_dir(recipe: Recipe, state=None) -> Path:
    """Create (or, with resume/overwrite, reuse) the run folder; an existing run is never replaced silently.

    Under `accelerate launch` every rank decides on the folder as it is *before* rank 0 touches it (a barrier), so
    rank 1 never mistakes the folder rank 0 just created for an old run."""
    run_dir, t = recipe.run_dir, recipe.training
    is_main_process = state is None or state.is_main_process
    existing = run_dir.exists() and any(run_dir.iterdir())
    if existing and not t.overwrite and t.resume != "auto":
        raise RecipeError(
            f"{recipe.source}: run folder {run_dir} already exists. Continue it with training.resume=auto, "
            f"replace it with training.overwrite=true, or pick another training.run_name")
    if state is not None:
        state.wait_for_everyone()
    if is_main_process:
        if existing and t.overwrite:
            log.warning("training.overwrite=true: deleting the existing run folder %s", run_dir)
            shutil.rmtree(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(run_dir / "recipe.yaml", resolved_recipe_text(recipe))
        except OSError as exc:
            raise RecipeError(f"{recipe.source}: training.output_dir: cannot write {run_dir}: {exc.strerror}") from None
    if state is not None:
        state.wait_for_everyone()
    return run_dir


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def resolved_recipe_text(recipe: Recipe) -> str:
    data = recipe_to_dict(recipe)
    header = f"# Resolved from {recipe.source}\n"
    return header + yaml.safe_dump({**data, "versions": library_versions()}, sort_keys=False)


# ------------------------------------------------------------------------------------------------ checkpoints


def checkpoint_is_complete(folder: Path) -> bool:
    """A checkpoint is usable if qlora-kit marked it complete, or if the trainer got as far as its last file.

    transformers writes `trainer_state.json` last, so a run killed mid-save leaves a folder without it (or with
    weights that do not parse); such a folder is never resumed from.
    """
    if (folder / COMPLETE_MARKER).is_file():
        return True
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    weights = [p for p in folder.glob("*.safetensors")]
    return bool(weights) and all(safetensors_header_ok(p) for p in weights)


def safetensors_header_ok(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            json.loads(handle.read(size))
        return path.stat().st_size >= 8 + size
    except (OSError, ValueError):
        return False


def mark_checkpoint_complete(folder: Path) -> None:
    """fsync every file of a finished checkpoint, then write the marker: after this it survives a power cut."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    write_atomically(folder / COMPLETE_MARKER, json.dumps({"files": sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())}) + "\n")


def find_resume_checkpoint(recipe: Recipe, run_dir: Path) -> str | None:
    """The newest complete checkpoint; incomplete ones are renamed aside with a warning, never loaded."""
    from transformers.trainer_utils import get_last_checkpoint

    checkpoints = run_dir / "checkpoints"
    if recipe.training.resume != "auto" or not checkpoints.is_dir():
        return None
    while (last := get_last_checkpoint(str(checkpoints))) is not None:
        if checkpoint_is_complete(Path(last)):
            log.info("resuming from %s", last)
            return last
        aside = Path(f"{last}.incomplete-{int(time.time())}")
        log.warning("%s is incomplete (the run stopped while saving it); skipping it, moved to %s", last, aside.name)
        os.replace(last, aside)
    log.info("training.resume=auto: no checkpoint in %s yet; starting from scratch", checkpoints)
    return None
