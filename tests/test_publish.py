"""`qlora-kit push`: the folder it uploads (--dry-run), the model card, the upload itself against a local stand-in for
the Hub (tests/local_hub.py), the error for each way it can fail, and that what is uploaded works with plain
transformers + peft."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from local_hub import LocalHub

TOKEN = "hf_qlorakitTESTtoken0123456789"
BASE = ("--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct")  # the tiny test model stands in for it
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "generation_config.json"}
RECORD_FILES = {"training/recipe.yaml", "training/summary.json", "training/metrics.jsonl", "training/loss.png",
                "training/learning_rate.png", "training/grad_norm.png"}


def push(*args: str, hub: LocalHub | None = None, token: str | None = TOKEN, endpoint: str | None = None,
         home: Path) -> subprocess.CompletedProcess:
    """`qlora-kit push ...` as a user runs it: HF_ENDPOINT / HF_TOKEN from the environment, an empty HF_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1")
    if endpoint or hub:
        env["HF_ENDPOINT"] = endpoint or hub.endpoint
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "qlora_kit", "push", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture(scope="module")
def dry_run(finished_run, tmp_path_factory) -> Path:
    """The adapter upload folder, as `--dry-run` writes it."""
    out = tmp_path_factory.mktemp("dry") / "upload"
    result = push(str(finished_run), "--repo-id", "alice/shout", "--dry-run", "--out", str(out), token=None,
                  home=tmp_path_factory.mktemp("hf-home"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    return out


# ---------------------------------------------------------------------------------------- upload folder


def test_dry_run_writes_adapter_tokenizer_card_and_training_record_without_a_token(dry_run):
    assert set(files_in(dry_run)) == ADAPTER_FILES | RECORD_FILES | {"README.md"}
    assert not (dry_run / "training_args.bin").exists()  # a pickle nobody needs to load the adapter


def test_model_card_describes_base_usage_data_results_and_recipe(dry_run, finished_run):
    card = (dry_run / "README.md").read_text()
    metadata = front_matter(card)
    summary = json.loads((finished_run / "summary.json").read_text())

    assert metadata["library_name"] == "peft"
    assert metadata["pipeline_tag"] == "text-generation"
    assert {"qlora-kit", "qlora", "lora"} <= set(metadata["tags"])
    assert "base_model" not in metadata  # the base was a local folder, not a Hub id
    assert "replace `BASE` below with the Hub id" in card
    assert "model = PeftModel.from_pretrained(base, \"alice/shout\")" in card
    assert '{"role": "system", "content": "Answer in capitals."}' in card  # the training system prompt
    assert "| train | 32 |" in card and "| validation | 8 |" in card
    assert f"| eval loss | {summary['eval_loss']:.4g}" in card
    assert "![loss](training/loss.png)" in card
    assert "```yaml\nmodel:\n  name:" in card and "lora:\n  r: 8\n" in card


def test_base_model_flag_names_the_hub_base_in_card_and_adapter_config(finished_run, tmp_path):
    out = tmp_path / "upload"

    result = push(str(finished_run), "--repo-id", "alice/shout", "--dry-run", "--out", str(out),
                  "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct", token=None, home=tmp_path)

    assert result.returncode == 0, result.stderr
    metadata = front_matter((out / "README.md").read_text())
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in metadata["tags"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    trained_with = json.loads((finished_run / "adapter" / "adapter_config.json").read_text())
    assert trained_with["base_model_name_or_path"] != config["base_model_name_or_path"]  # the run is left as it was
    assert 'BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"' in (out / "README.md").read_text()


def test_credentials_in_sft_args_are_redacted_from_the_uploaded_recipe(finished_run, tmp_path):
    import shutil

    from qlora_kit.publish import build_upload_folder

    run = shutil.copytree(finished_run, tmp_path / "run")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["training"]["sft_args"] = {"hub_token": TOKEN, "hub_model_id": "alice/shout"}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    folder = build_upload_folder(run, tmp_path / "upload", "alice/shout")

    uploaded = yaml.safe_load((folder / "training" / "recipe.yaml").read_text())
    assert uploaded["training"]["sft_args"] == {"hub_token": "<redacted>", "hub_model_id": "alice/shout"}
    assert all(TOKEN.encode() not in data for data in files_in(folder).values())


# ------------------------------------------------------------------------------------------------ upload


def test_push_creates_the_repo_and_uploads_exactly_the_dry_run_files(finished_run, tmp_path):
    dry_run = tmp_path / "dry"
    assert push(str(finished_run), "--repo-id", "alice/shout", "--dry-run", "--out", str(dry_run), *BASE,
                token=None, home=tmp_path).returncode == 0
    with LocalHub(token=TOKEN) as hub:
        result = push(str(finished_run), "--repo-id", "alice/shout", "--private", *BASE, hub=hub, home=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{hub.endpoint}/alice/shout"
    repo = hub.repos["alice/shout"]
    assert repo.private is True
    assert repo.files == files_in(dry_run)  # byte for byte what --dry-run showed
    assert repo.commits == ["qlora-kit: upload adapter from run shout"]
    assert hub.unexpected == []
    assert hub.authorization - {""} == {f"Bearer {TOKEN}"}  # the token travels only as a header ...
    for text in (result.stdout, result.stderr, *(p.read_text(errors="ignore") for p in finished_run.rglob("*")
                                                  if p.is_file() and p.suffix in {".json", ".jsonl", ".yaml", ".md"})):
        assert TOKEN not in text  # ... and is in no output, log or run file


def test_push_merged_uploads_a_model_that_plain_transformers_loads(finished_run, tmp_path):
    with LocalHub(token=TOKEN, orgs=("acme",), writable_orgs=("acme",)) as hub:
        result = push(str(finished_run), "--repo-id", "acme/shout-merged", "--merged", hub=hub, home=tmp_path)

    assert result.returncode == 0, result.stderr
    files = hub.repos["acme/shout-merged"].files
    assert {"config.json", "model.safetensors", "tokenizer.json", "merge_check.json", "README.md"} <= set(files)
    assert "adapter_config.json" not in files
    assert front_matter(files["README.md"].decode())["library_name"] == "transformers"


def test_push_gguf_uploads_the_gguf_a_modelfile_and_how_to_run_them(finished_run, tmp_path):
    import shutil

    from qlora_kit.gguf import render_go_template

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)  # the push exports a GGUF into the run; the shared run stays as it was
    with LocalHub(token=TOKEN) as hub:
        result = push(str(run), "--repo-id", "alice/shout-gguf", "--gguf", *BASE, hub=hub, home=tmp_path / "home")

    assert result.returncode == 0, result.stderr
    files = hub.repos["alice/shout-gguf"].files
    assert files["model-q8_0.gguf"] == (run / "gguf" / "model-q8_0.gguf").read_bytes()
    assert json.loads(files["training/model-q8_0.check.json"])["passed"]
    assert "adapter_model.safetensors" in files  # the adapter is uploaded as before
    modelfile = files["Modelfile"].decode()
    assert "FROM ./model-q8_0.gguf\n" in modelfile and 'SYSTEM """Answer in capitals."""' in modelfile
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert render_go_template(template, [{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")
    card = files["README.md"].decode()
    assert "## GGUF (llama.cpp, Ollama, LM Studio)" in card
    assert "llama-cli -m model-q8_0.gguf" in card and "ollama create shout-gguf -f Modelfile" in card
    assert "| `model-q8_0.gguf` | q8_0 |" in card


def test_push_again_to_an_existing_repo_adds_a_commit(finished_run, tmp_path):
    with LocalHub(token=TOKEN) as hub:
        first = push(str(finished_run), "--repo-id", "alice/shout", *BASE, hub=hub, home=tmp_path)
        second = push(str(finished_run), "--repo-id", "alice/shout", *BASE, hub=hub, home=tmp_path)

    assert first.returncode == second.returncode == 0, second.stderr
    assert len(hub.repos["alice/shout"].commits) == 2


# ------------------------------------------------------------------------------------------------ errors


def test_push_without_a_token_exits_2_and_says_how_to_log_in(finished_run, tmp_path):
    with LocalHub(token=TOKEN) as hub:
        result = push(str(finished_run), "--repo-id", "alice/shout", hub=hub, token=None, home=tmp_path)

    assert result.returncode == 2
    assert "no Hugging Face token: set HF_TOKEN" in result.stderr and "hf auth login" in result.stderr
    assert hub.repos == {}


def test_push_with_a_rejected_token_exits_2(finished_run, tmp_path):
    with LocalHub(token=TOKEN) as hub:
        result = push(str(finished_run), "--repo-id", "alice/shout", hub=hub, token="hf_wrong", home=tmp_path)

    assert result.returncode == 2
    assert "the Hub rejected your token (401 Unauthorized)" in result.stderr
    assert "Traceback" not in result.stderr


def test_push_to_another_users_namespace_exits_2_before_creating_anything(finished_run, tmp_path):
    with LocalHub(token=TOKEN, user="alice", orgs=("acme",)) as hub:
        result = push(str(finished_run), "--repo-id", "bob/shout", hub=hub, home=tmp_path)

    assert result.returncode == 2
    assert ("bob/shout: you are logged in as 'alice' and cannot create repos under 'bob'; use your user 'alice' or "
            "your organisations (acme), e.g. alice/shout") in result.stderr
    assert "POST /api/repos/create" not in hub.requests


def test_push_refused_by_the_hub_exits_2_with_the_reason(finished_run, tmp_path):
    with LocalHub(token=TOKEN, orgs=("acme",), writable_orgs=()) as hub:  # a member of acme without write access
        result = push(str(finished_run), "--repo-id", "acme/shout", *BASE, hub=hub, home=tmp_path)

    assert result.returncode == 2
    assert "acme/shout: your token may not write there (403 Forbidden)" in result.stderr


def test_push_with_the_hub_unreachable_exits_2(finished_run, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"

    result = push(str(finished_run), "--repo-id", "alice/shout", endpoint=closed, home=tmp_path)

    assert result.returncode == 2
    assert f"cannot reach the Hub at {closed}" in result.stderr
    assert "Traceback" not in result.stderr


def test_push_with_a_malformed_repo_id_exits_2(finished_run, tmp_path):
    result = push(str(finished_run), "--repo-id", "just-a-name", "--dry-run", token=None, home=tmp_path)

    assert result.returncode == 2
    assert "--repo-id: 'just-a-name' is not USER/NAME" in result.stderr


# ----------------------------------------------------------------------- the uploaded files, without qlora-kit


def chat_inputs(tokenizer) -> dict[str, torch.Tensor]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in ("Shout the words apple river.", "What is the capital of France?")]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.eval()(**inputs).logits[inputs["attention_mask"].bool()]


def test_uploaded_adapter_and_merged_model_load_with_plain_peft_and_transformers(finished_run, dry_run,
                                                                                 tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_folder = tmp_path / "merged-upload"
    result = push(str(finished_run), "--repo-id", "alice/shout-merged", "--merged", "--dry-run", "--out",
                  str(merged_folder), token=None, home=tmp_path)
    assert result.returncode == 0, result.stderr

    tokenizer = AutoTokenizer.from_pretrained(dry_run)
    inputs = chat_inputs(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, dry_run)
    merged = AutoModelForCausalLM.from_pretrained(merged_folder, dtype=torch.float32)

    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(merged_folder).chat_template
    assert torch.allclose(logits(merged, inputs), logits(with_adapter, inputs), atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------------- push from a recipe


@pytest.fixture
def hub_reachable(monkeypatch, tmp_path):
    """In-process pushes: huggingface_hub read HF_HUB_OFFLINE (set by conftest) and HF_ENDPOINT at import."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return monkeypatch


def test_recipe_with_export_push_uploads_at_the_end_of_training(make_recipe, hub_reachable, tmp_path):
    from qlora_kit.pipeline import run_training
    from qlora_kit.recipe import load_recipe

    recipe = make_recipe("pushed", training={"max_steps": 2}, data={"cache": False},
                         export={"merge": False, "push": {"repo_id": "alice/pushed", "private": True,
                                                          "base_model": BASE[1]}})
    with LocalHub(token=TOKEN) as hub:
        hub_reachable.setattr("huggingface_hub.constants.ENDPOINT", hub.endpoint)
        hub_reachable.setenv("HF_TOKEN", TOKEN)
        run_training(load_recipe(recipe))

    repo = hub.repos["alice/pushed"]
    assert repo.private is True
    assert ADAPTER_FILES | {"README.md", "training/recipe.yaml", "training/loss.png"} <= set(repo.files)
    assert (tmp_path / "outputs" / "pushed" / "report" / "report.md").is_file()  # the report is written first


def test_recipe_with_export_push_and_no_token_fails_before_training(make_recipe, hub_reachable, tmp_path):
    from qlora_kit.pipeline import run_training
    from qlora_kit.recipe import QloraKitError, load_recipe

    recipe = make_recipe("pushed", export={"push": {"repo_id": "alice/pushed", "base_model": BASE[1]}})

    with pytest.raises(QloraKitError, match="no Hugging Face token: set HF_TOKEN"):
        run_training(load_recipe(recipe))
    assert not (tmp_path / "outputs" / "pushed").exists()  # nothing was started


def test_a_push_removes_upload_folders_left_by_killed_pushes_but_not_live_ones(tmp_path):
    """A push killed mid-upload leaves `.push.PID.*` in the run; the next push clears it, never a running one's."""
    import os

    from qlora_kit.publish import remove_stale_upload_folders

    dead = tmp_path / ".push.99999999.abc" / "upload"  # no such process
    live = tmp_path / f".push.{os.getpid()}.def" / "upload"
    for folder in (dead, live):
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"x")
    remove_stale_upload_folders(tmp_path)
    assert not dead.parent.exists()
    assert live.is_dir()


def test_a_dry_run_never_writes_into_or_over_what_is_at_out(finished_run, tmp_path):
    """--out is the user's path: a file there, or a folder with anything in it, is refused and left as it was."""
    from qlora_kit.publish import push_run
    from qlora_kit.recipe import QloraKitError

    note = tmp_path / "note.txt"
    note.write_text("mine")
    with pytest.raises(QloraKitError, match=r"note.txt is a file; --out names the folder to write the upload into"):
        push_run(finished_run, "alice/shout", dry_run=True, out=note)
    with pytest.raises(QloraKitError, match=r"already exists and is not empty; delete it or pass another --out"):
        push_run(finished_run, "alice/shout", dry_run=True, out=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["note.txt"] and note.read_text() == "mine"
