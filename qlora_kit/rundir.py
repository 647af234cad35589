"""The run folder: prepare it, write into it atomically, mark checkpoints complete, find the one to resume from.

Every file or folder qlora-kit publishes goes through `write_atomically` or `atomic_folder`: a reader (or a run
killed mid-write) sees the old version or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shlex
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import yaml

from qlora_kit.recipe import QloraKitError, Recipe, RecipeError, error_summary, recipe_to_dict

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


def refuse_path_under_file(target: Path) -> None:
    """A file where a folder above `target` should be is the user's path to fix (mkdir would say only "File exists"
    or "Not a directory"); read-only, so commands check their output path before the work that writes it."""
    for parent in (target.parent, *target.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise QloraKitError(f"{target}: {parent} is a file, so nothing can be written under it; pick another "
                                    "path")
            return


def make_parent_folder(target: Path) -> None:
    """Create the folders above `target` (refuse_path_under_file first)."""
    refuse_path_under_file(target)
    target.parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_folder(target: Path, replace: bool = True, listed: bool = True) -> Iterator[Path]:
    """Yield an empty hidden folder next to `target`; when the block ends without an error it becomes `target`.

    On an error the partial folder is removed and `target` is untouched. With `replace=False` an existing `target`
    (another process finished first, e.g. a shared cache entry) is kept and the new copy dropped. `listed`: the
    folder holds FOLDER_MANIFEST (not a folder that must hold exactly what is uploaded)."""
    make_parent_folder(target)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial.", dir=target.parent))
    try:
        yield partial
        if target.exists() and not replace:
            shutil.rmtree(partial)
            return
        publish_dir(partial, target, listed)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


# the files qlora-kit wrote into a folder it published, listed inside it: replacing that folder deletes those only
FOLDER_MANIFEST = ".qlora-kit-files.json"
# what an output folder of an earlier qlora-kit (before the manifest) holds: adapter, merged model, report, Ollama
EARLIER_OUTPUT_FILES = ("adapter_config.json", "merge_check.json", "report.md", "gguf_check.json")


def publish_dir(partial: Path, target: Path, listed: bool = True) -> None:
    """Move a fully written folder into place, with the list of its files; an older `target` is swapped out first,
    then deleted, where refuse_foreign_output allows that."""
    refuse_foreign_output(target)
    if listed:
        files = sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())
        (partial / FOLDER_MANIFEST).write_text(json.dumps(files, indent=0) + "\n")
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        log.info("%s: replacing the one qlora-kit wrote earlier", target)
        os.replace(target, old)
    os.replace(partial, target)
    shutil.rmtree(old, ignore_errors=True)


def refuse_foreign_output(target: Path) -> None:
    """An output folder qlora-kit is about to replace holds nothing qlora-kit did not write there: a file in its
    place, a folder of someone else's, or a file added to one of ours is refused, never deleted. Commands call it
    before their work too (a merge takes minutes); publish_dir calls it again at the swap."""
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise QloraKitError(f"{target} is a file qlora-kit did not write; move it away, or write the output "
                            "elsewhere")
    manifest = target / FOLDER_MANIFEST
    present = {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()} - {FOLDER_MANIFEST}
    if manifest.is_file():
        try:
            ours = set(json.loads(manifest.read_text()))
        except (ValueError, TypeError):
            ours = set()
        foreign = sorted(present - ours)
    else:  # written before the manifest, or not by qlora-kit at all
        foreign = [] if not present or any((target / name).is_file() for name in EARLIER_OUTPUT_FILES) else \
            sorted(present)
    if foreign:
        raise QloraKitError(f"{target} holds {foreign[0]}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}"
                            ", which qlora-kit did not write; replacing the folder would delete it. Move it away, "
                            "or write the output elsewhere")


# ------------------------------------------------------------------------------------------------ saved parts


@contextlib.contextmanager
def saved_part_errors(folder: Path, what: str, remedy: str) -> Iterator[None]:
    """Reading a part a run saved (its adapter, merged model, summary, recipe) that is not what qlora-kit wrote
    there: a damaged, truncated or half-copied run folder is one message naming the folder and the fix, not a
    traceback. What the readers raise for that (transformers 5.17-5.24, peft 0.21, safetensors, json, yaml): OSError
    without an errno or "no such file", ValueError (bad JSON, no model_type, a missing local file peft takes for a Hub
    id), safetensors' SafetensorError, YAMLError. Other file-system errors (permissions, a full disk) go on to the
    CLI's own messages."""
    try:
        yield
    except Exception as exc:
        damaged = (isinstance(exc, (ValueError, yaml.YAMLError)) or type(exc).__name__ == "SafetensorError"
                   or (isinstance(exc, OSError) and exc.errno in (None, errno.ENOENT)))
        if not damaged:
            raise
        why = error_summary(exc)
        raise QloraKitError(f"{folder}: cannot read {what} ({why}); {remedy}") from None


def trained_adapter(run_dir: Path, missing_fix: str = "train the recipe first") -> tuple[Path, Any]:
    """RUN_DIR/adapter and the tokenizer saved beside it, read through as peft and transformers will read them (its
    config, its weights' headers, the tokenizer) before any model loads: a missing one says `missing_fix`, a damaged
    one names the part (saved_part_errors). The tokenizer is returned for the callers that use it."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise QloraKitError(f"{run_dir}: no trained adapter in {adapter}; {missing_fix}")
    with saved_part_errors(adapter, "the trained adapter", damaged_adapter(run_dir)):
        json.loads((adapter / "adapter_config.json").read_text())
        with safe_open(str(adapter / "adapter_model.safetensors"), "np") as handle:
            list(handle.keys())  # noqa: SIM118 (safe_open is not a dict)
    with saved_part_errors(adapter, "the trained adapter's tokenizer", damaged_adapter(run_dir)):
        tokenizer = AutoTokenizer.from_pretrained(adapter)
    return adapter, tokenizer


def damaged_adapter(run_dir: Path) -> str:
    """The fix for a run whose adapter folder cannot be read."""
    return (f"the run folder is damaged or incomplete (a partial copy?): copy {run_dir} again from where it was "
            "trained, or train again (training.overwrite=true)")


def damaged_merged(run_dir: Path) -> str:
    """The fix for a run whose merged model cannot be read."""
    return f"`qlora-kit merge {run_dir}` writes it again from the adapter"


# ------------------------------------------------------------------------------------------------ run folder

RUN_MARKER = "qlora_kit_run.json"
# Changing any of these makes a checkpoint meaningless: other weights, another adapter shape, other data order or
# positions, another batch geometry. `training.resume=auto` refuses them (dotted prefixes of recipe keys).
RESUME_INVARIANT_KEYS = ("method", "model", "quantization", "lora", "data", "training.batch_size",
                         "training.gradient_accumulation_steps", "training.max_length", "training.packing",
                         "training.padding_free")


@dataclass
class RunFolder:
    """The run folder this process trains in, and what it must undo if the run fails before saving anything."""

    path: Path
    found: Literal["missing", "empty", "run"]  # what was there before this process: only what it added is undone
    replaced: Path | None = None  # overwrite=true: the earlier run, moved aside until this one has saved something
    lock: RunLock | None = None

    def begin(self, recipe: Recipe, processes: int = 1) -> None:
        """Training starts: every check passed, so the run's recipe.yaml is written (replacing a resumed run's)."""
        write_atomically(self.path / "recipe.yaml", resolved_recipe_text(recipe))
        marker = json.loads((self.path / RUN_MARKER).read_text())
        write_atomically(self.path / RUN_MARKER, json.dumps({**marker, "processes": processes}, indent=2) + "\n")

    def saved_something(self) -> bool:
        return any((self.path / "checkpoints").glob("checkpoint-*")) or (self.path / "adapter").exists()

    def finish(self, failed: bool) -> None:
        """Keep or undo: a failed run that saved nothing leaves things as they were before it started."""
        try:
            if failed and not self.saved_something():
                self.roll_back()
            elif self.replaced is not None:
                shutil.rmtree(self.replaced)
                log.info("training.overwrite=true: the earlier run that was in %s is deleted", self.path)
        finally:
            if self.lock is not None:
                self.lock.release()

    def roll_back(self) -> None:
        if self.found == "missing" and self.path.is_dir():
            shutil.rmtree(self.path)
        elif self.found == "empty":  # everything in it is this run's
            for child in self.path.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        elif self.found == "run" and self.replaced is None:
            return  # a resumed run keeps all it had
        if self.replaced is not None:
            os.replace(self.replaced, self.path)
            log.info("training.overwrite=true: the new run saved nothing, so the earlier run is back in %s", self.path)
        else:
            log.info("removed what this run wrote in %s: it failed before saving anything", self.path)


class RunLock:
    """An exclusive lock on a run name for the life of a run (`fcntl.flock`, released by the kernel when the process
    dies, so a stale lock file from a killed run is simply taken over). The file names the owner's pid and host."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = None

    def acquire(self, run_dir: Path) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise RecipeError(f"run folder {run_dir} is in use by a run that is still going ({owner}); wait for it "
                              "to finish or stop it, or give this run another training.run_name") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing drops the flock; the file stays, naming no live owner
            self.handle = None


def is_run_folder(folder: Path) -> bool:
    """A folder qlora-kit made for a run: it holds the run marker (or, from versions before the marker, the resolved
    recipe.yaml only qlora-kit writes)."""
    if (folder / RUN_MARKER).is_file():
        return True
    recipe = folder / "recipe.yaml"
    try:
        return recipe.is_file() and recipe.read_text(errors="replace").startswith("# Resolved from ")
    except OSError:
        return False


@contextlib.contextmanager
def open_run_folder(recipe: Recipe, state=None) -> Iterator[RunFolder]:
    """Lock the run name, then create or reuse its folder; on an error, undo what this process did and nothing else.

    Nothing is deleted here: overwrite=true moves an earlier run aside, and it is deleted only once the new run has
    saved a checkpoint or finished. Under `accelerate launch` only the main process touches the folder; the others
    wait for it (a barrier on each side)."""
    main = state is None or state.is_main_process
    run = prepare_run_dir(recipe, main)
    if state is not None:
        state.wait_for_everyone()
    failed = True
    try:
        yield run
        failed = False
    finally:
        if main:
            run.finish(failed)


def prepare_run_dir(recipe: Recipe, main: bool = True) -> RunFolder:
    """Decide what to do with the run folder before any data or weights load; refuse what would lose work."""
    run_dir = recipe.run_dir
    if not main:
        return RunFolder(run_dir, "run")  # only the main process creates or removes anything
    check_output_dir(recipe)
    lock = RunLock(run_dir.with_name(f".{run_dir.name}.lock"))
    try:
        lock.acquire(run_dir)
    except OSError as exc:
        raise RecipeError(f"{recipe.source}: training.output_dir: cannot write {run_dir.parent}: "
                          f"{exc.strerror}") from None
    try:
        return claim_run_dir(recipe, lock)
    except BaseException:
        lock.release()
        raise


def check_output_dir(recipe: Recipe) -> None:
    """training.output_dir can hold the run folder: its nearest existing folder is a folder this user can write.
    `validate` runs it, `train` before its lock (which is written next to the run folder). Permission bits do not
    say it all (root passes them everywhere, yet nothing can be made in /proc or /sys, or on a read-only mount), so
    an empty folder is made there and removed at once: nothing else is touched."""
    where = f"{recipe.source}: training.output_dir"
    long = next((part for part in recipe.run_dir.parent.parts if len(part.encode()) > 255), None)
    if long is not None:
        raise RecipeError(f"{where}: the folder name {long[:40]}... is {len(long.encode())} bytes long, over the 255 "
                          "a folder name may have; shorten it")
    existing = recipe.run_dir.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RecipeError(f"{where}: {existing} is a file, not a folder; point training.output_dir at a folder (it is "
                          "created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeError(f"{where}: cannot write in {existing} (permission denied); pick a folder you can write to")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".qlora-kit-write-check.", dir=existing))
    except OSError as exc:
        raise RecipeError(f"{where}: cannot create folders in {existing} ({exc.strerror}); pick a folder you can "
                          "write to") from None


def check_run_dir(recipe: Recipe) -> bool:
    """The run folder's refusals, read-only (what `validate` reports and `train` enforces before writing anything):
    a file in its place, a folder qlora-kit did not create, an earlier run with neither resume nor overwrite, a resume
    whose recipe changes make the checkpoints meaningless. Returns whether an earlier run's folder is there. Run
    after check_output_dir."""
    run_dir, t = recipe.run_dir, recipe.training
    where = f"{recipe.source}: training.run_name"
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"{where}: {run_dir} is a file, not a folder; pick another training.run_name")
    existing = run_dir.is_dir() and any(run_dir.iterdir())
    if existing and not is_run_folder(run_dir):
        raise RecipeError(f"{where}: {run_dir} exists and is not a qlora-kit run folder (no {RUN_MARKER}); "
                          "qlora-kit never replaces or writes into a folder it did not create. Pick another "
                          "training.run_name or training.output_dir, or move that folder away yourself")
    if existing and not t.overwrite and t.resume != "auto":
        raise RecipeError(f"{where}: run folder {run_dir} already exists. Continue it with training.resume=auto, "
                          "replace it with training.overwrite=true, or pick another training.run_name")
    if existing and t.resume == "auto":
        check_resume_compatible(recipe, run_dir)
        if not any((folder / COMPLETE_MARKER).is_file() for folder in checkpoint_folders(run_dir)):
            refuse_to_retrain_over_adapter(recipe, run_dir, "none was saved, or they were deleted")
    return existing


def checkpoint_folders(run_dir: Path) -> list[Path]:
    checkpoints = run_dir / "checkpoints"
    return [p for p in checkpoints.glob("checkpoint-*") if p.is_dir()] if checkpoints.is_dir() else []


def refuse_to_retrain_over_adapter(recipe: Recipe, run_dir: Path, why: str) -> None:
    """resume=auto with no checkpoint to resume from starts over, and that run's save replaces the adapter: refused
    where a trained adapter is there (a finished run whose checkpoints were deleted to save disk, say)."""
    adapter = run_dir / "adapter"
    if (adapter / "adapter_config.json").is_file():
        raise RecipeError(
            f"{recipe.source}: training.resume=auto: {run_dir} holds a trained adapter ({adapter}) but no checkpoint "
            f"to resume from ({why}; a checkpoint holds the optimizer and the data position, the adapter alone does "
            "not), so training would start over and replace that adapter. Pass training.overwrite=true to start over "
            "(the earlier run is replaced), or pick another training.run_name")


def claim_run_dir(recipe: Recipe, lock: RunLock) -> RunFolder:
    run_dir = recipe.run_dir
    existing = check_run_dir(recipe)
    try:
        if existing and recipe.training.overwrite:
            aside = run_dir.with_name(f".{run_dir.name}.replaced-{int(time.time())}")
            os.replace(run_dir, aside)
            log.warning("training.overwrite=true: the earlier run in %s is moved aside to %s and deleted once this "
                        "run has saved something (it comes back if this run fails first)", run_dir, aside.name)
            run = RunFolder(run_dir, "missing", replaced=aside, lock=lock)
        else:
            run = RunFolder(run_dir, "run" if existing else "empty" if run_dir.is_dir() else "missing", lock=lock)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / RUN_MARKER).is_file():
            write_atomically(run_dir / RUN_MARKER, json.dumps({
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "qlora_kit": library_versions()["qlora-kit"],
                "host": socket.gethostname()}, indent=2) + "\n")
    except OSError as exc:
        raise RecipeError(f"{recipe.source}: training.output_dir: cannot write {run_dir}: {exc.strerror}") from None
    return run


def check_resume_compatible(recipe: Recipe, run_dir: Path) -> None:
    """Refuse to resume with a recipe whose changes make the run's checkpoints meaningless; list each change."""
    from qlora_kit.recipe import read_run_recipe

    if not any((run_dir / "checkpoints").glob("checkpoint-*")):
        return  # nothing to resume: any recipe may start here
    before, after = flatten(recipe_to_dict(read_run_recipe(run_dir))), flatten(recipe_to_dict(recipe))
    changed = [f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in sorted(set(before) | set(after))
               if before.get(key) != after.get(key) and key.startswith(tuple(f"{k}" for k in RESUME_INVARIANT_KEYS))]
    if changed:
        raise RecipeError(f"{recipe.source}: training.resume=auto: the run in {run_dir} was trained with another "
                          "recipe, and its checkpoints do not fit these changes:\n  " + "\n  ".join(changed) +
                          "\nUndo them to resume, or start a new run (another training.run_name, or "
                          "training.overwrite=true to replace this one)")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def resume_command(recipe: Recipe) -> str:
    """The command that continues this run, ready to paste: the same recipe and overrides, plus resume=auto."""
    keep = [o for o in recipe.overrides if o.split("=", 1)[0].strip() not in ("training.resume", "training.overwrite")]
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = (["accelerate", "launch", "--num_processes", str(processes), "train.py"] if processes > 1
                else ["qlora-kit", "train"])
    return shlex.join([*launcher, recipe.source, *keep, "training.resume=auto"])


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
    """Whether a checkpoint can be resumed from: every file qlora-kit recorded when it marked the checkpoint complete
    is there with the same size and SHA-256; an unmarked one (killed before the marker) needs the trainer's last file
    and weights whose headers parse."""
    marker = folder / COMPLETE_MARKER
    if marker.is_file():
        try:
            files = json.loads(marker.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if isinstance(files, list):  # written before sizes and hashes were recorded
            return all((folder / name).is_file() for name in files) and all(
                safetensors_header_ok(p) for p in folder.glob("*.safetensors"))
        return all(file_matches(folder / name, facts) for name, facts in files.items())
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    weights = [p for p in folder.glob("*.safetensors")]
    return bool(weights) and all(safetensors_header_ok(p) for p in weights)


def file_matches(path: Path, facts: dict[str, Any]) -> bool:
    try:
        return path.stat().st_size == facts["size"] and sha256_of(path) == facts["sha256"]
    except (OSError, KeyError, TypeError):
        return False


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def safetensors_header_ok(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            json.loads(handle.read(size))
        return path.stat().st_size >= 8 + size
    except (OSError, ValueError):
        return False


def mark_checkpoint_complete(folder: Path) -> None:
    """fsync every file of a finished checkpoint, then record each one's size and hash in the marker: after this it
    survives a power cut, and a file damaged later is noticed before a resume loads it."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != COMPLETE_MARKER:
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
            files[str(path.relative_to(folder))] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    write_atomically(folder / COMPLETE_MARKER, json.dumps({"files": files}, indent=1) + "\n")


def find_resume_checkpoint(recipe: Recipe, run_dir: Path) -> str | None:
    """The newest checkpoint whose files check out; a damaged or incomplete one is moved aside with a warning and
    the one before it is used."""
    from transformers.trainer_utils import get_last_checkpoint

    checkpoints = run_dir / "checkpoints"
    if recipe.training.resume != "auto" or not checkpoints.is_dir():
        return None
    while (last := get_last_checkpoint(str(checkpoints))) is not None:
        if checkpoint_is_complete(Path(last)):
            log.info("resuming from %s", last)
            return last
        damaged = (Path(last) / COMPLETE_MARKER).is_file()
        aside = Path(f"{last}.{'damaged' if damaged else 'incomplete'}-{int(time.time())}")
        log.warning("%s is %s; skipping it (moved to %s) and resuming from the checkpoint before it, if any", last,
                    "damaged (its files no longer match what was saved)" if damaged
                    else "incomplete (the run stopped while saving it)", aside.name)
        os.replace(last, aside)
    refuse_to_retrain_over_adapter(recipe, run_dir, "the ones there were damaged and are moved aside")
    log.info("training.resume=auto: no checkpoint in %s yet; starting from scratch", checkpoints)
    return None
