"""Merge a trained adapter into a full-precision base, and prove the merged model computes what the adapter did."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_kit.model import base_model_folder, resolve_dtype
from qlora_kit.recipe import QloraKitError, read_run_recipe
from qlora_kit.rundir import atomic_folder, write_atomically

log = logging.getLogger("qlora_kit")

# Largest |logit difference| accepted between the merged model and base+adapter, by merge dtype. fp32 differs only by
# summation order; 16-bit formats round W + BA once more than the unmerged path does.
DEFAULT_TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 2.5e-1}

CHECK_PROMPTS = [
    "Write one sentence about the sea.",
    "What is 12 plus 30?",
    "Translate 'good morning' into French.",
]


@dataclass
class MergeCheck:
    dtype: str
    max_abs_logit_diff: float
    tolerance: float
    top1_agreement: float
    passed: bool


def merge_adapter(run_dir: str | Path, out: str | Path | None = None, tolerance: float | None = None) -> Path:
    """Base in full precision + adapter -> merge_and_unload -> safetensors + tokenizer, after a logits check."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise QloraKitError(f"{run_dir}: no trained adapter in {adapter}; train the recipe first")
    recipe = read_run_recipe(run_dir)
    target = Path(out) if out else run_dir / "merged"
    if target.exists() and out is not None:
        raise QloraKitError(f"{target} already exists; pass another --out or delete it first")
    dtype = resolve_dtype(recipe.model.dtype, "model.dtype")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = base_model_folder(recipe.model)
    log.info("merging %s into %s (%s, %s)", adapter, folder, str(dtype).removeprefix("torch."), device)
    base = AutoModelForCausalLM.from_pretrained(folder, revision=recipe.model.revision, dtype=dtype,
                                                trust_remote_code=recipe.model.trust_remote_code, device_map=device)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(base, adapter)
    inputs = check_inputs(tokenizer, device)
    adapter_logits = logits_of(model, inputs)
    merged = model.merge_and_unload()
    merged_logits = logits_of(merged, inputs)
    limit = tolerance or recipe.export.merge_check_tolerance or DEFAULT_TOLERANCE[dtype]
    check = compare_logits(adapter_logits, merged_logits, inputs["attention_mask"], dtype, limit)
    if not check.passed:
        raise QloraKitError(f"merge check failed: merged logits differ from base+adapter by up to "
                            f"{check.max_abs_logit_diff:.3g} (tolerance {limit:g}); the merged model was not written")
    save_merged(merged, tokenizer, adapter, target, check)
    log.info("merged model saved to %s (max |logit diff| %.2e <= %g, top-1 agreement %.1f%%)", target,
             check.max_abs_logit_diff, limit, 100 * check.top1_agreement)
    return target


def check_inputs(tokenizer, device: str) -> dict[str, torch.Tensor]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in CHECK_PROMPTS]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)


@torch.no_grad()
def logits_of(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(**inputs).logits.float()


def compare_logits(expected: torch.Tensor, actual: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype,
                   tolerance: float) -> MergeCheck:
    real = mask.bool()
    diff = (expected - actual).abs()[real]
    agreement = (expected.argmax(-1) == actual.argmax(-1))[real].float().mean().item()
    worst = diff.max().item()
    return MergeCheck(str(dtype).removeprefix("torch."), worst, tolerance, agreement, worst <= tolerance)


def save_merged(merged, tokenizer, adapter: Path, target: Path, check: MergeCheck) -> None:
    with atomic_folder(target) as partial:
        merged.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        if (adapter / "generation_config.json").is_file():
            shutil.copy(adapter / "generation_config.json", partial / "generation_config.json")
        write_atomically(partial / "merge_check.json", json.dumps(asdict(check), indent=2) + "\n")
