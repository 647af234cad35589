"""Each model-family recipe in recipes/ validates against a tiny model of its family, built offline from the family's
config class (the real module names, tiny sizes, no weights), with `model.name` overridden to that folder."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from qlora_kit.cli import main

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import recipe_memory_table  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096)

# recipe -> (transformers config class, its tiny arguments)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama-3.1-8b.yaml": ("LlamaConfig", TINY),
    "mistral-7b.yaml": ("MistralConfig", TINY),
    "qwen2.5-7b.yaml": ("Qwen2Config", TINY),
    "qwen3-8b.yaml": ("Qwen3Config", {**TINY, "head_dim": 16}),
    "gemma-2-9b.yaml": ("Gemma2Config", {**TINY, "head_dim": 16}),
    "gemma-3-4b.yaml": ("Gemma3Config", {"text_config": {**TINY, "head_dim": 16},
                                         "vision_config": {"hidden_size": 32, "intermediate_size": 64,
                                                           "num_hidden_layers": 1, "num_attention_heads": 2,
                                                           "image_size": 32, "patch_size": 8},
                                         "mm_tokens_per_image": 4}),
    "phi-4-mini.yaml": ("Phi3Config", {**TINY, "partial_rotary_factor": 0.75}),
    "smollm2-1.7b.yaml": ("LlamaConfig", TINY),
}


def family_recipes() -> list[str]:
    return sorted(p.name for p in (REPO / "recipes").glob("*.yaml") if not p.name.startswith("quickstart"))


def build_family_model(folder: Path, config_class: str, kwargs: dict, tokenizer_dir: Path) -> Path:
    """config.json of a tiny model of the family, plus the tiny ChatML tokenizer (no weights are needed)."""
    import transformers

    folder.mkdir(parents=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if "text_config" in kwargs:
        kwargs = {**kwargs, "text_config": {**kwargs["text_config"], **ids}}
    else:
        kwargs = {**kwargs, **ids}
    getattr(transformers, config_class)(**kwargs).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {recipe: build_family_model(root / recipe.removesuffix(".yaml"), cls, kwargs, tiny_model_dir)
            for recipe, (cls, kwargs) in FAMILIES.items()}


def validate(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["validate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_family_recipe_has_a_tiny_model_to_validate_against():
    assert family_recipes() == sorted(FAMILIES)


@pytest.mark.parametrize("recipe", sorted(FAMILIES))
def test_family_recipe_validates_against_its_model_family(recipe, family_models, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipes read recipes/data/quickstart/people.jsonl

    code, out, err = validate(capsys, f"recipes/{recipe}", f"model.name={family_models[recipe]}")

    assert code == 0, err
    assert f"recipes/{recipe}: valid (552 training rows" in out  # 600 rows, 48 held out
    assert "lora.target_modules: found in the model" in out


@pytest.mark.parametrize("recipe", sorted(FAMILIES))
def test_family_recipe_offline_without_the_model_says_how_to_get_it(recipe, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))  # an empty Hub cache, offline

    code, _, err = validate(capsys, f"recipes/{recipe}")

    assert code == 2
    assert "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache" in err and "`hf download " in err


@pytest.mark.parametrize("recipe", sorted(FAMILIES))
def test_family_recipe_validates_online_without_the_model_in_the_cache(recipe, capsys, monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.chdir(REPO)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))  # an empty Hub cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    looked_up = []
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda url, **kwargs: looked_up.append(url))

    code, out, err = validate(capsys, f"recipes/{recipe}")

    assert code == 0, err
    assert len(looked_up) == 1 and looked_up[0].endswith("/config.json")  # the Hub has it: training can fetch it
    assert "lora.target_modules: not checked, the model's config is not on this machine" in out


def test_llama_module_names_fail_on_phi_with_the_real_names_listed(family_models, capsys, monkeypatch):
    monkeypatch.chdir(REPO)

    code, _, err = validate(capsys, "recipes/phi-4-mini.yaml", f"model.name={family_models['phi-4-mini.yaml']}",
                            "lora.target_modules=[q_proj, v_proj]")

    assert code == 2
    assert err.strip() == ("qlora-kit: error: recipes/phi-4-mini.yaml: lora.target_modules: 'q_proj' is not a layer "
                           "of Phi3ForCausalLM (did you mean 'qkv_proj'?); the linear layers of Phi3ForCausalLM are: "
                           "down_proj, gate_up_proj, o_proj, qkv_proj")


def test_fused_phi_names_fail_on_llama(family_models, capsys, monkeypatch):
    monkeypatch.chdir(REPO)

    code, _, err = validate(capsys, "recipes/llama-3.1-8b.yaml", f"model.name={family_models['llama-3.1-8b.yaml']}",
                            "lora.target_modules=[qkv_proj, o_proj]")

    assert code == 2
    assert "'qkv_proj' is not a layer of LlamaForCausalLM" in err
    assert "the linear layers of LlamaForCausalLM are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" \
        in err


def test_lm_head_as_a_lora_target_is_refused_with_the_alternative(family_models, capsys, monkeypatch):
    monkeypatch.chdir(REPO)

    code, _, err = validate(capsys, "recipes/smollm2-1.7b.yaml", f"model.name={family_models['smollm2-1.7b.yaml']}",
                            "lora.target_modules=[q_proj, lm_head]")

    assert code == 2
    assert "'lm_head' is the output layer" in err and "lora.modules_to_save: [lm_head]" in err


def test_gemma3_pattern_adapts_the_language_model_and_not_the_vision_tower(family_models, tiny_model_dir, tmp_path):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    pattern = yaml.safe_load((REPO / "recipes" / "gemma-3-4b.yaml").read_text())["lora"]["target_modules"]
    text_only = build_family_model(tmp_path / "gemma-3-1b", "Gemma3TextConfig", {**TINY, "head_dim": 16},
                                   tiny_model_dir)
    for folder, arch in ((family_models["gemma-3-4b.yaml"], "Gemma3ForConditionalGeneration"),
                         (text_only, "Gemma3ForCausalLM")):
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
        adapted = [name for name, _ in model.named_modules() if re.fullmatch(pattern, name)]

        assert type(model).__name__ == arch
        assert len(adapted) == 2 * 7  # 2 decoder layers x q, k, v, o, gate, up, down
        assert not any("vision" in name for name in adapted)


def test_recipes_readme_lists_every_recipe_and_its_memory_table_is_current():
    readme = (REPO / "recipes" / "README.md").read_text()

    quickstarts = [p.name for p in (REPO / "recipes").glob("quickstart*.yaml")]
    assert all(f"[{name}]({name})" in readme for name in [*family_recipes(), *quickstarts])
    assert recipe_memory_table.updated_readme(readme) == readme, \
        "recipes/README.md is stale: run python scripts/recipe_memory_table.py"


def test_hub_recipe_is_checked_once_the_model_config_is_in_the_hub_cache(family_models, capsys, monkeypatch,
                                                                         tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    snapshot = tmp_path / "models--meta-llama--Llama-3.1-8B-Instruct" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    shutil.copy(family_models["llama-3.1-8b.yaml"] / "config.json", snapshot / "config.json")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")

    code, out, err = validate(capsys, "recipes/llama-3.1-8b.yaml")  # model.name is the Hub id, as shipped

    assert code == 0, err
    assert "lora.target_modules: found in the model" in out
