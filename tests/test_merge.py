"""`qlora-kit merge`: fp32 arithmetic layer by layer, written in bf16/fp16/fp32 on the original or the dequantized NF4
base, and a check that passes honest rounding and fails a merge that is wrong. Tiny random Llama on CPU; SmolLM2 in
`slow` tests."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_random_model
from safetensors.torch import load_file, save_file

from qlora_kit import export
from qlora_kit.export import merge_adapter
from qlora_kit.pipeline import run_training
from qlora_kit.recipe import QloraKitError, load_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, recipe_writer) -> Path:
    """8 NF4 steps at a high learning rate, so the adapter moves the logits well past any rounding; 4 held-out rows."""
    folder = tmp_path_factory.mktemp("merge")
    recipe = recipe_writer(folder, "tiny", data={"validation": 4, "cache": False},
                           training={"max_steps": 8, "learning_rate": 2e-2}, export={"merge": False, "report": False})
    run_training(load_recipe(recipe))
    return folder / "outputs" / "tiny"


@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the run folder, for tests that write into it or break its adapter."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    return copy


def merge_check(folder: Path) -> dict:
    return json.loads((folder / "merge_check.json").read_text())


def lora_scaling(adapter: Path) -> float:
    config = json.loads((adapter / "adapter_config.json").read_text())
    rank = config["r"]
    return config["lora_alpha"] / (math.sqrt(rank) if config["use_rslora"] else rank)


def expected_weight(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], name: str, scaling: float,
                    dequantize=None) -> torch.Tensor:
    """W + scaling * B @ A in fp32, from the files alone (no peft)."""
    weight = base[f"{name}.weight"].float() if dequantize is None else dequantize(name)
    a = lora[f"base_model.model.{name}.lora_A.weight"].float()
    b = lora[f"base_model.model.{name}.lora_B.weight"].float()
    return weight + scaling * (b @ a)


def adapted_layers(lora: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in lora if ".lora_A." in k)


# ------------------------------------------------------------------------------------------- honest merges


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("base", ["original", "dequantized"])
def test_merge_in_each_dtype_and_base_writes_w_plus_scaled_ba_and_passes_the_check(
        run_copy: Path, tiny_model_dir: Path, dtype: str, base: str) -> None:
    out = merge_adapter(run_copy, out=run_copy / f"merged-{dtype}-{base}", dtype=dtype, base=base)

    torch_dtype = export.MERGE_DTYPES[dtype]
    merged = load_file(out / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch_dtype}
    original = load_file(tiny_model_dir / "model.safetensors")
    lora = load_file(run_copy / "adapter" / "adapter_model.safetensors")
    scaling = lora_scaling(run_copy / "adapter")
    dequantize = None
    if base == "dequantized":
        quantized = export.QuantizedBase(load_recipe_of(run_copy), str(tiny_model_dir))
        dequantize = quantized.weight
        untouched = sorted(quantized.layers.keys() - set(adapted_layers(lora)))
        for name in untouched:  # quantized in training but not adapted: written as dequantized too
            assert torch.equal(merged[f"{name}.weight"], quantized.weight(name).to(torch_dtype))
    layers = adapted_layers(lora)
    assert len(layers) == 14  # all-linear on 2 layers: 7 projections each
    for name in layers:
        expected = expected_weight(original, lora, name, scaling, dequantize)
        # one rounding from fp32 to the dtype: bit-exact for fp32 up to summation order, else within half an ulp
        assert torch.allclose(merged[f"{name}.weight"].float(), expected.to(torch_dtype).float(), rtol=0,
                              atol=2e-6 if dtype == "fp32" else 0), name
    check = merge_check(out)
    assert check["passed"] and check["failures"] == []
    assert check["dtype"] == dtype and check["base"] == base
    assert check["inputs"] == {"check_prompts": 3, "heldout_rows": 4}
    assert check["merge_rounding"]["max_abs_logit_diff"] <= check["margin"] * max(
        check["rounding_budget"]["max_abs_logit_diff"], 1e-4)
    same_base = check["merged_vs_trained"] if base == "dequantized" else check["merged_vs_full_precision"]
    assert same_base == check["merge_rounding"]
    assert check["quantization"]["max_abs_logit_diff"] > 0  # NF4 moved the logits, measured separately


def load_recipe_of(run_dir: Path):
    from qlora_kit.recipe import read_run_recipe

    return read_run_recipe(run_dir)


def test_the_check_s_trained_model_reference_is_what_the_4bit_layers_compute(run_copy: Path) -> None:
    """The fp32 model with dequantize(NF4(W)) swapped in computes what bitsandbytes' Linear4bit + LoRA computes in
    training (CPU, fp32 compute): the reference the merge is checked against is the model that was trained."""
    from qlora_kit.evaluate import load_trained_model
    from qlora_kit.model import keep_4bit_weights_in_training_layout
    from qlora_kit.recipe import read_run_recipe

    recipe = read_run_recipe(run_copy)
    tokenizer = load_trained_model(run_copy).tokenizer
    inputs, _ = export.check_inputs(tokenizer, recipe)
    folder = recipe.model.name
    quantized = export.QuantizedBase(recipe, folder)
    references = export.reference_logits(recipe, folder, run_copy / "adapter", quantized, inputs, "cpu")
    trained = load_trained_model(run_copy).model  # 4-bit base + adapter, as `qlora-kit eval` loads it
    keep_4bit_weights_in_training_layout(trained)  # else bitsandbytes' CPU eval kernel computes in bf16

    as_evaluated = export.logits_on(trained, inputs, "cpu")

    assert torch.allclose(references.trained, as_evaluated, rtol=0, atol=1e-5)
    assert not torch.allclose(references.full_precision, as_evaluated, rtol=0, atol=1e-3)


# ------------------------------------------------------------------------------------------ broken merges


def doubling_the_scale(original):
    def merge_layer(module, dtype, device, weight=None):
        module.scaling = {name: 2 * s for name, s in module.scaling.items()}
        original(module, dtype, device, weight)

    return merge_layer


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_doubled_lora_scale_fails_the_check_and_writes_nothing(run_copy: Path, dtype: str, monkeypatch) -> None:
    monkeypatch.setattr(export, "merge_layer", doubling_the_scale(export.merge_layer))

    with pytest.raises(export.MergeCheckFailed) as caught:
        merge_adapter(run_copy, dtype=dtype)

    message = str(caught.value)
    assert message.startswith(f"merge check failed ({dtype}, original base): the merged model differs from the "
                              "unmerged fp32 adapter model")
    assert "max |logit diff|" in message and "mean KL" in message and "the merge itself is wrong" in message
    check = caught.value.check
    assert not check.passed
    assert check.merge_rounding.max_abs_logit_diff > check.margin * max(check.rounding_budget.max_abs_logit_diff,
                                                                        1e-4)
    assert not (run_copy / "merged").exists() and not list(run_copy.glob(".merged*"))


def test_a_layer_left_unmerged_fails_the_check(run_copy: Path, monkeypatch) -> None:
    from peft.tuners.lora import LoraLayer

    original = export.merge_layer
    seen: list[object] = []

    def merge_layer(module: LoraLayer, dtype, device, weight=None):
        seen.append(module)
        if len(seen) == 5:  # layer 0's gate_proj (q, k, v, o come first): shipped without its adapter
            module.get_base_layer().weight.data = module.get_base_layer().weight.data.to(dtype)
            return
        original(module, dtype, device, weight)

    monkeypatch.setattr(export, "merge_layer", merge_layer)

    with pytest.raises(export.MergeCheckFailed) as caught:
        merge_adapter(run_copy, dtype="bf16")

    assert len(seen) == 14
    message = str(caught.value)
    assert "1 LoRA layer(s) were not merged: model.layers.0.mlp.gate_proj;" in message
    assert "differs from the unmerged fp32 adapter model" in message  # and the logits show it too


def test_an_fp16_overflow_fails_the_check_naming_the_layer(run_copy: Path) -> None:
    weights_file = run_copy / "adapter" / "adapter_model.safetensors"
    weights = load_file(weights_file)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    weights[key] = weights[key] * 1e8  # W + BA beyond fp16's 65504, still finite in fp32
    save_file(weights, weights_file)

    with pytest.raises(export.MergeCheckFailed) as caught:
        merge_adapter(run_copy, dtype="fp16")

    message = str(caught.value)
    assert "do not fit in fp16 (largest finite value 6.55e+04): model.layers.1.mlp.down_proj.weight" in message
    assert "--dtype bf16 or fp32" in message


# ----------------------------------------------------------------------------------------------- memory


def test_the_merge_holds_one_layer_in_fp32_at_a_time(run_copy: Path, tiny_model_dir: Path, tmp_path: Path,
                                                      monkeypatch) -> None:
    """A bf16 checkpoint merged into bf16: while peft merges a layer, that layer's weight is the only fp32 weight of
    the model (a merge that upcast the model first would hold every layer in fp32)."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16_base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(bf16_base)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(bf16_base)
    recipe_file = run_copy / "recipe.yaml"
    recipe_file.write_text(recipe_file.read_text().replace(str(tiny_model_dir), str(bf16_base)))

    models: list[torch.nn.Module] = []
    loaded = peft.PeftModel.from_pretrained

    def record(*args, **kwargs):
        models.append(loaded(*args, **kwargs))
        return models[-1]

    fp32_at_merge: list[tuple[int, int]] = []
    original = export.merge_layer

    def measured(module, dtype, device, weight=None):
        merge = module.merge

        def merge_and_measure(*args, **kwargs):
            base_weights = [p for n, p in models[-1].named_parameters() if "lora_" not in n]
            fp32 = sum(p.numel() * 4 for p in base_weights if p.dtype is torch.float32)
            fp32_at_merge.append((fp32, module.get_base_layer().weight.numel() * 4))
            return merge(*args, **kwargs)

        module.merge = merge_and_measure
        original(module, dtype, device, weight)

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", record)
    monkeypatch.setattr(export, "merge_layer", measured)

    merge_adapter(run_copy, dtype="bf16")

    assert len(fp32_at_merge) == 14
    assert all(fp32 == this_layer for fp32, this_layer in fp32_at_merge), fp32_at_merge
    total = sum(p.numel() * 4 for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert max(fp32 for fp32, _ in fp32_at_merge) < total / 10


# --------------------------------------------------------------------------------------------- choices


def test_merge_defaults_to_the_recipe_dtype_and_the_original_base(run_copy: Path) -> None:
    out = merge_adapter(run_copy)  # model.dtype auto on a CPU: fp32

    check = merge_check(out)
    assert (check["dtype"], check["base"], check["device"]) == ("fp32", "original", "cpu")
    assert out == run_copy / "merged"


def test_dequantized_base_is_refused_for_a_run_without_a_4bit_base(run_copy: Path) -> None:
    recipe_file = run_copy / "recipe.yaml"
    recipe_file.write_text(recipe_file.read_text().replace("load_in_4bit: true", "load_in_4bit: false"))

    with pytest.raises(QloraKitError, match="--base dequantized: .* not a 4-bit base; .* use --base original"):
        merge_adapter(run_copy, base="dequantized")


def test_cli_merge_takes_dtype_base_and_out(run_copy: Path, tmp_path: Path) -> None:
    from qlora_kit.cli import main

    out = tmp_path / "shipped"
    status = main(["merge", str(run_copy), "--dtype", "bf16", "--base", "dequantized", "--device", "cpu", "--out",
                   str(out)])

    assert status == 0
    check = merge_check(out)
    assert check["passed"] and (check["dtype"], check["base"]) == ("bf16", "dequantized")
    assert not (run_copy / "merged").exists()


def test_cli_merge_on_cuda_without_a_gpu_exits_2(run_copy: Path, capsys) -> None:
    from qlora_kit.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["merge", str(run_copy), "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA GPU" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory) -> Path:
    """The quickstart recipe on the real SmolLM2-135M-Instruct, cut to 8 steps (enough for its adapter to answer in
    JSON: the logits move by far more than any rounding), with its 48 held-out rows."""
    folder = tmp_path_factory.mktemp("smollm2-merge")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # the recipe's data path is relative to the repository root
        recipe = load_recipe(REPO / "recipes" / "quickstart.yaml",
                             [f"training.output_dir={folder}", "training.max_steps=8", "training.save_steps=100",
                              "evaluation.metric=none", "export.merge=false", "export.report=false"])
        run_training(recipe)
    return folder / "quickstart"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_smollm2_quickstart_adapter_merged_in_16_bits_passes(smollm2_run: Path, tmp_path: Path, dtype: str,
                                                              monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # the held-out rows are read from the recipe's relative data path
    out = merge_adapter(smollm2_run, out=tmp_path / dtype, dtype=dtype)

    check = merge_check(out)
    assert check["passed"] and check["inputs"] == {"check_prompts": 3, "heldout_rows": 4}
    # the merge costs about what rounding the base alone to this dtype costs...
    assert check["merge_rounding"]["top1_agreement"] >= check["rounding_budget"]["top1_agreement"] - 0.05
    # ...and what separates it from the trained (NF4) model is the base's quantization, not the merge
    trained, quantization = check["merged_vs_trained"], check["quantization"]
    assert abs(trained["top1_agreement"] - quantization["top1_agreement"]) < 0.05
    assert trained["mean_kl"] < 1.5 * quantization["mean_kl"] + check["rounding_budget"]["mean_kl"]


@pytest.mark.slow
def test_smollm2_with_a_doubled_lora_scale_fails(smollm2_run: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(export, "merge_layer", doubling_the_scale(export.merge_layer))

    with pytest.raises(export.MergeCheckFailed, match=r"merge check failed \(bf16, original base\): the merged model "
                                                      "differs from the unmerged fp32 adapter model"):
        merge_adapter(smollm2_run, out=tmp_path / "broken", dtype="bf16")

    assert not (tmp_path / "broken").exists()


# ------------------------------------------------------------------------------- layouts other than Llama's


def other_layout_model(kind: str, folder: Path, tiny_model_dir: Path) -> Path:
    """GPT-2 (Conv1D layers: weights stored [in, out], which bitsandbytes quantizes as [out, in]) or Mixtral (MoE
    experts as 3-D parameters, adapted by peft's all-linear through target_parameters), 2 layers, 64 wide."""
    from transformers import AutoTokenizer, GPT2Config, MixtralConfig

    vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    config = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256) if kind == "gpt2" else \
        MixtralConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                      max_position_embeddings=256)
    return save_random_model(config, folder, tiny_model_dir)


@pytest.mark.parametrize("kind", ["gpt2", "mixtral"])
def test_conv1d_and_moe_expert_adapters_merge_and_pass_the_check(kind, tmp_path, tiny_model_dir, recipe_writer):
    """The merge upcasts and merges the parameter each LoRA layer adapts: a Conv1D's weight in its own [in, out]
    layout (the dequantized 4-bit one transposed back), an MoE experts module's 3-D parameters (no `weight`)."""
    model = other_layout_model(kind, tmp_path / kind, tiny_model_dir)
    recipe = recipe_writer(tmp_path, kind, model={"name": str(model)}, data={"validation": 4, "cache": False},
                           training={"max_steps": 4, "learning_rate": 2e-2}, export={"merge": False, "report": False})
    run_training(load_recipe(recipe))
    run = tmp_path / "outputs" / kind
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert bool(config.get("target_parameters")) is (kind == "mixtral")  # the experts' 3-D weights are adapted

    for base in ("original", "dequantized"):
        out = merge_adapter(run, out=tmp_path / f"merged-{base}", dtype="fp32", base=base)
        check = merge_check(out)
        assert check["passed"] and not check["failures"], check


@pytest.mark.parametrize("intruder", ["file_inside", "foreign_folder", "file_in_place"])
def test_merge_and_report_never_delete_what_qlora_kit_did_not_write(run_copy: Path, intruder: str):
    """RUN_DIR/merged and RUN_DIR/report are qlora-kit's and are written again on request; a file someone added to
    them, a folder of theirs under that name or a file in its place is refused, left as it was, before any work."""
    from qlora_kit.report import write_report
    from qlora_kit.rundir import FOLDER_MANIFEST

    report = write_report(run_copy)
    assert (report / FOLDER_MANIFEST).is_file()
    write_report(run_copy)  # qlora-kit's own folder: replaced
    for name in ("merged", "report"):
        target = run_copy / name
        if intruder == "file_inside":
            if name == "merged":
                merge_adapter(run_copy, dtype="fp32")
            (target / "MY_NOTES.txt").write_text("mine")
        elif intruder == "foreign_folder":
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            (target / "important.txt").write_text("mine")
        else:
            shutil.rmtree(target, ignore_errors=True)
            target.write_text("mine")
        before = sorted(p.name for p in target.iterdir()) if target.is_dir() else target.read_text()
        with pytest.raises(QloraKitError, match=rf"{name}.*(which qlora-kit did not write|a file qlora-kit did not "
                                                rf"write); .*(Move it away|move it away)"):
            merge_adapter(run_copy, dtype="fp32") if name == "merged" else write_report(run_copy)
        after = sorted(p.name for p in target.iterdir()) if target.is_dir() else target.read_text()
        assert after == before
        assert not (run_copy / f".{name}.old").exists()
