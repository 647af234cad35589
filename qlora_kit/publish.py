"""Upload a run to the Hugging Face Hub: the adapter (or merged model), a generated model card, and the training record.

The upload folder is built first, exactly as it will appear in the repo (`--dry-run` stops there). The token comes
from huggingface_hub (HF_TOKEN, or `hf auth login`); it is only ever sent in request headers, never written to the
run folder, the folder uploaded, the logs or the card, and the upload is refused if it appears in any file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from qlora_kit.recipe import QloraKitError, Recipe, read_run_recipe
from qlora_kit.report import (
    data_table,
    eval_note,
    eval_table,
    generation_table,
    plot_metrics,
    read_json,
    read_metrics,
    render_markdown,
    run_facts,
)
from qlora_kit.rundir import FOLDER_MANIFEST, atomic_folder, refuse_path_under_file, trained_adapter

log = logging.getLogger("qlora_kit")

# Never uploaded: peft's placeholder card (ours replaces it) and the pickled TrainingArguments (not needed to load
# the model, and unpickling files from the Hub is unsafe).
SKIPPED_FILES = {"README.md", "training_args.bin", FOLDER_MANIFEST}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SECRET_KEY = re.compile(r"token|secret|password|api_key", re.I)


# ------------------------------------------------------------------------------------------- upload folder


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()


@dataclasses.dataclass
class BaseModel:
    """The base model as the world may see it: its Hub id when known, and words for the card (never a local path)."""

    hub_id: str | None
    described: str
    gguf_name: str | None = None  # general.name of a GGUF base


def find_base_model(recipe: Recipe, base_model: str | None) -> BaseModel:
    """--base-model, else the recipe's Hub id, else what the local files say: a Hugging Face cache snapshot's folder
    name (models--ORG--NAME) or a GGUF file's source repository; else an unknown id and a description."""
    m = recipe.model
    if base_model is not None:
        if not is_hub_id(base_model):
            raise QloraKitError(f"--base-model: {base_model!r} is not a Hub model id like meta-llama/Llama-3.1-8B")
        return BaseModel(base_model, f"`{base_model}`", gguf_metadata(recipe).get("general.name"))
    if is_hub_id(m.name):
        return BaseModel(m.name, f"`{m.name}`")
    snapshot = next((part for part in Path(m.name).parts if part.startswith("models--")), None)
    found = snapshot.removeprefix("models--").replace("--", "/", 1) if snapshot else None
    if m.gguf_file is None:
        return BaseModel(found, f"`{found}`" if found else f"a local model folder (`{Path(m.name).name}`)")
    metadata = gguf_metadata(recipe)
    for key in ("general.source.repo_url", "general.source.url"):
        match = re.match(r"https?://huggingface\.co/([\w.-]+/[\w.-]+)/?$", metadata.get(key, ""))
        if match and found is None:
            found = match.group(1)
    name = metadata.get("general.name")
    named = f" ({name})" if name else ""
    return BaseModel(found, f"the GGUF file `{m.gguf_file}`{named}", name)


def gguf_metadata(recipe: Recipe) -> dict[str, str]:
    """The string fields of a GGUF base's `general.*` metadata (empty for a non-GGUF base or a missing file)."""
    m = recipe.model
    path = Path(m.name).expanduser() / (m.gguf_file or "")
    if m.gguf_file is None or not path.is_file():
        return {}
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    return {key: field.contents() for key, field in fields.items()
            if key.startswith("general.") and isinstance(field.contents(), str)}


def build_upload_folder(run_dir: str | Path, target: str | Path, repo_id: str, merged: bool = False,
                        base_model: str | None = None, require_base: bool = False, gguf: bool = False) -> Path:
    """Write `target` with exactly the files the repo will get: weights + tokenizer, README.md, training/, and with
    `gguf` the run's GGUF files and a Modelfile.

    An adapter needs its base's Hub id: with `require_base` (a real upload) an unknown one is an error asking for
    --base-model; otherwise (a dry run) a warning. No local path is ever written.
    """
    run_dir, target = Path(run_dir), Path(target)
    recipe = read_run_recipe(run_dir)
    refuse_path_under_file(target)  # before a merge or an export runs for it
    base = find_base_model(recipe, base_model)
    if base.hub_id is None and not merged:
        ask = (f"the Hub id of the base model is unknown (training used {base.described}); pass --base-model HUB_ID "
               "with the Hub id of the same model, so the card and adapter_config.json name it")
        if require_base:
            raise QloraKitError(f"{run_dir}: {ask}")
        log.warning("%s; the upload will refuse to start without it", ask)
    source = run_dir / ("merged" if merged else "adapter")
    if merged and not (source / "config.json").is_file():
        from qlora_kit.export import merge_adapter  # deferred: loads torch

        log.info("no merged model in %s yet; merging first", run_dir)
        merge_adapter(run_dir)
    if not merged:
        trained_adapter(run_dir)
    if target.exists():
        if not target.is_dir():
            raise QloraKitError(f"{target} is a file; --out names the folder to write the upload into")
        if any(target.iterdir()):
            raise QloraKitError(f"{target} already exists and is not empty; delete it or pass another --out")
        target.rmdir()
    # written under a temporary name and renamed: a failure half-way leaves no partial upload folder behind
    with atomic_folder(target, listed=False) as folder:  # exactly what is uploaded
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in SKIPPED_FILES:
                link_or_copy(path, folder / path.name)
        if not merged:
            # peft (AutoPeftModelForCausalLM, the Hub widget) finds the base through this field; training wrote the
            # local path it loaded from, which must not be published.
            config = json.loads((folder / "adapter_config.json").read_text())  # read through by trained_adapter
            config["base_model_name_or_path"] = base.hub_id
            (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        record = folder / "training"
        record.mkdir()
        (record / "recipe.yaml").write_text(redacted_recipe_text(run_dir, base))
        for name in ("summary.json", "metrics.jsonl"):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, record / name)
        if (run_dir / "eval.json").is_file():
            evaluation = read_json(run_dir / "eval.json")
            if Path(str(evaluation.get("data", ""))).is_absolute():  # `--data FILE`: its name, not where it lives
                evaluation["data"] = Path(evaluation["data"]).name
            (record / "eval.json").write_text(json.dumps(evaluation, indent=2) + "\n")
        plots = plot_metrics(read_metrics(run_dir), record)
        ggufs = add_gguf_files(run_dir, folder, recipe) if gguf else []
        (folder / "README.md").write_text(model_card(run_dir, recipe, repo_id, base, merged, plots, ggufs))
        assert_no_local_paths(folder, run_dir)
    return target


def add_gguf_files(run_dir: Path, target: Path, recipe: Recipe) -> list[Path]:
    """The run's GGUF exports (RUN_DIR/gguf/*.gguf, a q8_0 one written first if there is none), their check records,
    and a Modelfile for the first merged-model GGUF."""
    from qlora_kit.gguf import export_run, write_modelfile

    if not list((run_dir / "gguf").glob("model-*.gguf")):
        log.info("no GGUF in %s yet; exporting one first", run_dir / "gguf")
        export_run(run_dir, "gguf")
    ggufs = sorted((run_dir / "gguf").glob("*.gguf"))
    for path in ggufs:
        link_or_copy(path, target / path.name)
        check = path.with_name(f"{path.stem}.check.json")
        if check.is_file():
            shutil.copy2(check, target / "training" / check.name)
    model = next(p for p in ggufs if p.name.startswith("model-"))
    write_modelfile(target, run_dir / "adapter", recipe.data.system_prompt, model.name)
    return [target / p.name for p in ggufs]


def local_path_markers(run_dir: Path) -> list[str]:
    """Prefixes of paths on this machine that a published file must never contain."""
    markers = {str(run_dir.resolve()), sys.prefix, str(Path.home())}
    return sorted(f"{m.rstrip('/')}/" for m in markers if m not in ("", "/"))


def assert_no_local_paths(folder: Path, run_dir: Path) -> None:
    """The card, configs and training record name no folder of this machine (home, virtualenv, run folder)."""
    markers = local_path_markers(run_dir)
    for path in folder.rglob("*"):
        if path.name in ("README.md", "adapter_config.json", "config.json") or path.parent.name == "training" and \
                path.suffix in (".yaml", ".json", ".jsonl"):
            text = path.read_text(errors="replace")
            if hit := next((m for m in markers if m in text), None):
                raise QloraKitError(f"refusing to upload: {path.relative_to(folder)} contains the local path {hit}; "
                                    "this is a bug in qlora-kit, please report it")


def link_or_copy(source: Path, target: Path) -> None:
    """Weights are hard-linked when the file system allows (a merged 8B model is 16 GB); small files are copied, so
    editing them in the upload folder never touches the run."""
    if source.suffix in (".safetensors", ".bin", ".gguf"):
        try:
            os.link(source, target)
            return
        except OSError:
            pass
    shutil.copy2(source, target)


def redacted_recipe_text(run_dir: Path, base: BaseModel | None = None) -> str:
    """The run's recipe.yaml as it may be published: credential-like sft_args values replaced, and local paths (the
    base model folder, data files, output folder) reduced to the base's Hub id or the files' names."""
    data = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    sft_args = (data.get("training") or {}).get("sft_args") or {}
    secrets = [key for key in sft_args if SECRET_KEY.search(key)]
    for key in secrets:
        sft_args[key] = "<redacted>"
    model, section, training = data.get("model") or {}, data.get("data") or {}, data.get("training") or {}
    if base is not None and model.get("name") and not is_hub_id(model["name"]):
        model["name"] = base.hub_id or f"<local folder {Path(model['name']).name}>"
    for source in section.get("datasets") or []:
        if source.get("path"):
            source["path"] = Path(source["path"]).name
    if isinstance(section.get("validation"), str):
        section["validation"] = Path(section["validation"]).name
    if training.get("output_dir"):
        training["output_dir"] = Path(training["output_dir"]).name
    note = "credentials redacted, " if secrets else ""
    return f"# Resolved recipe ({note}local paths reduced to names)\n" + yaml.safe_dump(data, sort_keys=False)


def assert_no_secret(folder: Path, secret: str | None) -> None:
    """Refuse to upload a folder in which the token appears, whatever put it there."""
    if not secret:
        return
    needle = secret.encode()
    for path in folder.rglob("*"):
        if path.is_file() and needle in path.read_bytes():
            raise QloraKitError(f"refusing to upload: {path.relative_to(folder)} contains your Hugging Face token")


# --------------------------------------------------------------------------------------------- model card


def model_card(run_dir: Path, recipe: Recipe, repo_id: str, base: BaseModel, merged: bool, plots: list[Path],
               ggufs: list[Path] | None = None) -> str:
    """README.md for the repo: Hub metadata, usage with plain transformers (+ peft), data, results, recipe."""
    from huggingface_hub import ModelCardData

    summary = read_json(run_dir / "summary.json")
    evaluation = read_json(run_dir / "eval.json")
    hub_base = base.hub_id
    hub_datasets = [s.hub for s in recipe.data.datasets if s.hub]
    tags = ["qlora-kit", "qlora", "sft", "trl"]
    if not merged:
        tags += ["lora"] + ([f"base_model:adapter:{hub_base}"] if hub_base else [])
    metadata = ModelCardData(base_model=hub_base, library_name="transformers" if merged else "peft",
                             pipeline_tag="text-generation", tags=tags, datasets=hub_datasets or None)
    what = "merged model (LoRA folded into the full-precision base)" if merged else "LoRA adapter"
    r, q = recipe.lora, recipe.quantization
    quant = f"4-bit {q.quant_type}" if q.load_in_4bit else "8-bit" if q.load_in_8bit else "an unquantized"
    blocks: list[tuple] = [
        ("h1", repo_id.split("/")[-1]),
        ("p", f"A {what} for {base.described}, fine-tuned with qlora-kit on a {quant} base "
              f"(QLoRA): rank {r.r}, alpha {r.alpha:g}, targets `{r.target_modules}`, trained on "
              f"{'every token' if recipe.data.loss_on == 'all' else 'assistant turns only'}."),
    ]
    if recipe.model.gguf_file:
        blocks.append(("p", f"The base was the GGUF file `{recipe.model.gguf_file}`"
                            + (f" ({base.gguf_name})" if base.gguf_name else "")
                            + ", dequantized to full precision before training: its weights carry the GGUF "
                              "quantization's rounding, so results on the original full-precision model can differ "
                              "slightly."))
    if hub_base is None:
        blocks.append(("p", f"Training used {base.described}, whose Hub id is not recorded; replace `BASE` below "
                            "with the Hub id of the same model, or push again with `--base-model HUB_ID`."))
    blocks += [("h2", "Usage"), ("code", usage_snippet(repo_id, hub_base, merged, recipe))]
    if ggufs:
        blocks += gguf_card_section(repo_id, ggufs)
    data = summary.get("data")
    sources = ", ".join(f"`{s.hub or Path(s.path).name}`" for s in recipe.data.datasets)
    blocks += [("h2", "Training data"),
               ("p", f"Sources: {sources}; held-out split: `{recipe.data.validation}`; system prompt: "
                     f"{repr(recipe.data.system_prompt) if recipe.data.system_prompt else 'none'}; "
                     f"max_length {recipe.training.max_length}.")]
    if data:
        blocks.append(("table", *data_table(data)))
    records = read_metrics(run_dir)
    facts = [f for f in run_facts(run_dir, records, summary) if f.name != "peak GPU memory" or
             summary.get("peak_gpu_memory_gib") is not None]
    blocks += [("h2", "Training results"), ("table", ["", "value"], [[f.name, f.value] for f in facts])]
    for title, table in (("Generation on the held-out split, before and after training:", generation_table(summary)),
                         ("`qlora-kit eval`, base model vs this adapter on the same rows:", eval_table(evaluation))):
        if table:
            blocks += [("p", title), ("table", *table)]
    if evaluation:
        blocks.append(("p", eval_note(evaluation)))
    for plot in plots:
        blocks.append(("img", f"training/{plot.name}", plot.stem.replace("_", " ")))
    recipe_text = yaml.safe_dump(yaml.safe_load(redacted_recipe_text(run_dir, base)), sort_keys=False)
    blocks += [("h2", "Recipe"), ("p", "The resolved recipe (also in `training/recipe.yaml`, with the library "
                                       "versions; metrics in `training/metrics.jsonl`):"),
               ("code", recipe_text, "yaml")]
    body = render_markdown(blocks_with_code(blocks))
    return f"---\n{metadata.to_yaml()}\n---\n\n{body}"


def gguf_card_section(repo_id: str, ggufs: list[Path]) -> list[tuple]:
    """How to run the GGUF files with llama.cpp and Ollama, and what each file's check measured."""
    models = [p for p in ggufs if p.name.startswith("model-")]
    adapters = [p for p in ggufs if not p.name.startswith("model-")]
    model = models[0].name
    rows = []
    for path in ggufs:
        check = read_json(path.parent / "training" / f"{path.stem}.check.json")
        if "max_abs_logit_diff_vs_merged" in check:
            measured = (f"max logit diff {check['max_abs_logit_diff_vs_merged']:.3g}, top-1 agreement "
                        f"{100 * check['top1_agreement_vs_merged']:.1f}%")
        else:
            measured = "tensors equal to the adapter's" if check.get("passed") else "not checked"
        rows.append([f"`{path.name}`", check.get("quant", "?"), f"{path.stat().st_size / 2**20:.1f} MiB", measured])
    commands = [f"huggingface-cli download {repo_id} {model} Modelfile --local-dir .",
                f"llama-cli -m {model} -cnv            # llama.cpp: chat with the chat template in the GGUF",
                f"ollama create {repo_id.split('/')[-1].lower()} -f Modelfile   # Ollama: TEMPLATE, stops and system "
                "prompt of training"]
    if adapters:
        commands.append(f"llama-cli -m BASE.gguf --lora {adapters[0].name} -cnv   # the adapter on a GGUF of the base")
    return [("h2", "GGUF (llama.cpp, Ollama, LM Studio)"),
            ("p", "Written by qlora-kit with the `gguf` package and checked before upload: read back by transformers "
                  "and compared with the merged model on check prompts (record in `training/*.check.json`)."),
            ("table", ["file", "type", "size", "vs the merged model"], rows),
            ("code", "\n".join(commands), "sh")]


def blocks_with_code(blocks: list[tuple]) -> list[tuple]:
    """render_markdown knows no code blocks; fenced code is passed through as a paragraph."""
    out = []
    for block in blocks:
        if block[0] == "code":
            language = block[2] if len(block) > 2 else "python"
            out.append(("p", f"```{language}\n{block[1].rstrip()}\n```"))
        else:
            out.append(block)
    return out


def usage_snippet(repo_id: str, hub_base: str | None, merged: bool, recipe: Recipe) -> str:
    messages = []
    if recipe.data.system_prompt:
        messages.append({"role": "system", "content": recipe.data.system_prompt})
    messages.append({"role": "user", "content": "..."})
    lines = ["import torch", "from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if merged:
        lines += ["", f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype="auto", device_map="auto")']
    else:
        base_line = f'BASE = "{hub_base}"' if hub_base else 'BASE = "..."  # Hub id of the base model'
        lines = ["import torch", "from peft import PeftModel", *lines[1:], "", base_line,
                 f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")  # the chat template used in training',
                 'base = AutoModelForCausalLM.from_pretrained(BASE, dtype="auto", device_map="auto")',
                 f'model = PeftModel.from_pretrained(base, "{repo_id}")',
                 "# Trained on a 4-bit base: to match training exactly, load BASE with quantization_config="
                 "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\")."]
    lines += ["", f"messages = {json.dumps(messages, ensure_ascii=False)}",
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
              "                                       return_dict=True).to(model.device)",
              "with torch.no_grad():",
              "    output = model.generate(**inputs, max_new_tokens=256)",
              'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))']
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- upload


def hub_token(context: str = "; `qlora-kit push --dry-run` needs none") -> str:
    """The token huggingface_hub would use (HF_TOKEN, then the `hf auth login` file); an error if there is none.

    `context` ends the message: what asked for the token and how to do without it.
    """
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise QloraKitError("no Hugging Face token: set HF_TOKEN (a write token from "
                            f"https://huggingface.co/settings/tokens) or run `hf auth login`{context}")
    return token


def check_push_settings(recipe: Recipe) -> None:
    """Before training: a recipe that uploads at the end must have a valid repo id and a token now, not hours later."""
    push = recipe.export.push
    if push.repo_id is None:
        return
    if not HUB_ID.match(push.repo_id):
        raise QloraKitError(f"{recipe.source}: export.push.repo_id: {push.repo_id!r} is not USER/NAME (or ORG/NAME)")
    if push.merged and not recipe.export.merge:
        raise QloraKitError(f"{recipe.source}: export.push.merged: needs export.merge: true (nothing merged to push)")
    if not push.merged and find_base_model(recipe, push.base_model).hub_id is None:
        raise QloraKitError(f"{recipe.source}: export.push.base_model: the adapter's base model has no known Hub id "
                            f"(model.name is {find_base_model(recipe, None).described}); set export.push.base_model to "
                            "the Hub id of the same model, or push the merged model (export.push.merged: true)")
    hub_token(f"; {recipe.source}: export.push.repo_id asks for an upload after training (set it to null to train "
              "without uploading, and push later with `qlora-kit push`)")


def transport_errors() -> tuple[type[Exception], ...]:
    """Network-failure classes of the HTTP client huggingface_hub uses: httpx up to hub 1.x, httpx2 from 2.x."""
    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


@contextlib.contextmanager
def hub_errors(repo_id: str, endpoint: str) -> Iterator[None]:
    """Turn huggingface_hub / HTTP-client failures into one actionable message each."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    namespace = repo_id.split("/")[0]
    try:
        yield
    except OfflineModeIsEnabled:
        raise QloraKitError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push, or use "
                            "--dry-run to see the folder") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        server = getattr(exc, "server_message", None) or str(exc).splitlines()[0]
        if status == 401:
            raise QloraKitError("the Hub rejected your token (401 Unauthorized): HF_TOKEN (or the token saved by "
                                "`hf auth login`) is invalid or expired") from None
        if status == 403:
            raise QloraKitError(f"{repo_id}: your token may not write there (403 Forbidden): the repo belongs to "
                                f"another user, the token is read-only, or it has no write access to the "
                                f"'{namespace}' organisation") from None
        if status == 404:
            raise QloraKitError(f"{repo_id}: repository not found (404) and could not be created: {server}") from None
        raise QloraKitError(f"{repo_id}: the Hub refused the upload ({status}): {server}") from None
    except (*transport_errors(), ConnectionError) as exc:
        raise QloraKitError(f"cannot reach the Hub at {endpoint} ({type(exc).__name__}: {exc}); check your network "
                            "connection (and HF_ENDPOINT if set), or use --dry-run") from None


def check_namespace(whoami: dict[str, Any], repo_id: str) -> None:
    """Fail before creating anything if the token's user cannot own `repo_id`."""
    namespace = repo_id.split("/")[0]
    user = whoami.get("name")
    orgs = [org.get("name") for org in whoami.get("orgs", [])]
    if namespace != user and namespace not in orgs:
        mine = f"your user '{user}'" + (f" or your organisations ({', '.join(orgs)})" if orgs else "")
        raise QloraKitError(f"{repo_id}: you are logged in as '{user}' and cannot create repos under '{namespace}'; "
                            f"use {mine}, e.g. {user}/{repo_id.split('/')[-1]}")
    role = (whoami.get("auth", {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise QloraKitError("your Hugging Face token is read-only; create a write token at "
                            "https://huggingface.co/settings/tokens and set HF_TOKEN to it")


def remove_stale_upload_folders(run_dir: Path) -> None:
    """A push killed mid-upload leaves its `.push.PID.*` folder in the run; remove those whose process is gone."""
    for folder in run_dir.glob(".push.*"):
        pid = folder.name.split(".")[2]
        if folder.is_dir() and not (pid.isdigit() and process_is_alive(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s, left by an interrupted push", folder)


def process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def push_run(run_dir: str | Path, repo_id: str, merged: bool = False, private: bool = False,
             base_model: str | None = None, dry_run: bool = False, out: str | Path | None = None,
             gguf: bool = False) -> str:
    """Upload the run (or with `dry_run`, only write the upload folder to `out`, default <run>/hub-upload).

    Returns the repo URL, or the folder written for a dry run.
    """
    from huggingface_hub import HfApi, constants

    run_dir = Path(run_dir)
    if not HUB_ID.match(repo_id):
        raise QloraKitError(f"--repo-id: {repo_id!r} is not USER/NAME (or ORG/NAME)")
    if dry_run:
        folder = build_upload_folder(run_dir, Path(out) if out else run_dir / "hub-upload", repo_id, merged,
                                     base_model, require_base=False, gguf=gguf)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        log.info("dry run: %d files that would be uploaded to %s are in %s", len(files), repo_id, folder)
        return str(folder)
    token = hub_token()
    api = HfApi(token=token)
    endpoint = api.endpoint or constants.ENDPOINT
    with hub_errors(repo_id, endpoint):
        check_namespace(api.whoami(), repo_id)
    remove_stale_upload_folders(run_dir)
    # in the run, so weights can be hard-linked; the pid in the name tells a later push whether its owner is alive
    with tempfile.TemporaryDirectory(prefix=f".push.{os.getpid()}.", dir=run_dir) as tmp:
        folder = build_upload_folder(run_dir, Path(tmp) / "upload", repo_id, merged, base_model, require_base=True,
                                     gguf=gguf)
        assert_no_secret(folder, token)
        with hub_errors(repo_id, endpoint):
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                       commit_message=f"qlora-kit: upload {'merged model' if merged else 'adapter'} "
                                                      f"from run {run_dir.name}")
    log.info("uploaded %s to %s (commit %s)", run_dir, url, getattr(commit, "oid", "?"))
    return str(url)
