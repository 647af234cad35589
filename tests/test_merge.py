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
from safetensors.torch import load_file, save_file

from qlora_kit import export
from qlora_kit.cli import run_training
from qlora_kit.export import merge_adapter
from qlora_kit.recipe import QloraKitError, load_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, recipe_writer) -> Path:
    """8 NF4 steps at a high learning rate, so the adapter moves the logits well beyond any rounding; 4 held-out rows."""
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
        untouched = sorted(quantized.layers - set(adapted_layers(lora)))
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
