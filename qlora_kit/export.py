"""Merge a trained adapter into its base with fp32 arithmetic, one layer at a time, and prove that the merged model
computes what the trained model did before anything is written (`merge_check.json`)."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from qlora_kit.model import base_model_folder, resolve_dtype
from qlora_kit.recipe import QloraKitError, Recipe, read_run_recipe
from qlora_kit.rundir import (
    atomic_folder,
    refuse_foreign_output,
    refuse_path_under_file,
    trained_adapter,
    write_atomically,
)

log = logging.getLogger("qlora_kit")

MERGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BASES = ("original", "dequantized")

# The merge may differ from the unmerged fp32 adapter model by this many times what rounding the base alone to the
# merge dtype costs (export.merge_check_tolerance overrides it); docs/export.md has the measurements behind it.
DEFAULT_MARGIN = 4.0
# An fp32 merge has no rounding budget of its own (the base loads bit-exact); what remains is summation order, bounded
# by this many fp32 epsilons per unit of the largest reference logit.
FP32_FLOOR_EPS = 2.0**12

CHECK_PROMPTS = [
    "Write one sentence about the sea.",
    "What is 12 plus 30?",
    "Translate 'good morning' into French.",
]
CHECK_HELDOUT_ROWS = 4  # rows of the run's own held-out split, teacher-forced with their reference answers
CHECK_MAX_TOKENS = 256


@dataclass
class Agreement:
    """How closely one model's next-token distributions follow a reference's, over every real token of the inputs."""

    top1_agreement: float
    mean_kl: float | None  # KL(reference || model), nats per token; None when the model's logits are not finite
    max_abs_logit_diff: float | None


@dataclass
class MergeCheck:
    dtype: str
    base: str
    device: str
    tokens: int
    inputs: dict[str, int]
    merged_vs_trained: Agreement | None  # the 4-bit base + adapter, as trained and evaluated (fp32 emulation)
    merged_vs_full_precision: Agreement  # the full-precision base + adapter, fp32
    merge_rounding: Agreement  # merged vs the unmerged fp32 adapter model on the same base: the merge's own error
    quantization: Agreement | None  # full-precision base vs 4-bit base, both + adapter, unmerged fp32
    rounding_budget: Agreement  # the base alone in the merge dtype vs in fp32: what honest rounding costs
    margin: float
    allowed: dict[str, float]  # merge_rounding limits: margin x budget (fp32: x the summation-order floor)
    passed: bool
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_gpu_memory_gib: float | None = None


class MergeCheckFailed(QloraKitError):
    """The merged model does not compute what the trained model did; `check` holds every number measured."""

    def __init__(self, message: str, check: MergeCheck) -> None:
        super().__init__(message)
        self.check = check


def merge_adapter(run_dir: str | Path, out: str | Path | None = None, dtype: str | None = None,
                  base: str = "original", device: str | None = None, tolerance: float | None = None) -> Path:
    """Fold the run's adapter into its base and write a plain transformers model, only if the check passes.

    dtype: bf16 | fp16 | fp32 (default: the recipe's model.dtype, `auto` resolved on this machine). base: `original`
    (full-precision W + BA) or `dequantized` (dequantize(NF4(W)) + BA: exactly the model that was trained). device:
    where the per-layer arithmetic runs (default: cuda when there is one). tolerance: the check's margin over the
    dtype's own rounding error (default: export.merge_check_tolerance, else DEFAULT_MARGIN).
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    recipe = read_run_recipe(run_dir)
    adapter, tokenizer = trained_adapter(run_dir)
    target = Path(out) if out else run_dir / "merged"
    if out is not None and target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise QloraKitError(f"{target} already exists; pass another --out or delete it first")  # an empty folder: ok
    refuse_path_under_file(target)
    refuse_foreign_output(target)  # RUN_DIR/merged: replaced only where it is qlora-kit's own
    merge_dtype = resolve_merge_dtype(recipe, dtype)
    device = resolve_device(device)
    check_base_choice(recipe, base)
    margin = tolerance or recipe.export.merge_check_tolerance or DEFAULT_MARGIN
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    folder = base_model_folder(recipe.model)
    dtype_name = dtype_label(merge_dtype)
    log.info("merging %s into %s: fp32 arithmetic layer by layer on %s, written in %s, %s base", adapter, folder,
             device, dtype_name, base)
    inputs, counts = check_inputs(tokenizer, recipe)
    quantized = load_trained_quantized_base(recipe, folder)
    references = reference_logits(recipe, folder, adapter, quantized, inputs, device)
    if merge_dtype is torch.float32:  # the base loads bit-exact in fp32: rounding costs nothing
        base_in_dtype = references.base_fp32
    else:
        base_in_dtype = base_logits_in(recipe, folder, merge_dtype, inputs, device)
    if base == "original":
        quantized = None  # its 4-bit layers were needed for the references only
    merged, overflowed, unmerged = merge_layerwise(recipe, folder, adapter, merge_dtype, device, quantized)
    quantized = None
    merged_logits = logits_on(merged, inputs, device)

    check = judge(references, base_in_dtype, merged_logits, merge_dtype, base, device, margin, overflowed, unmerged)
    check.tokens, check.inputs = int(inputs["attention_mask"].sum()), counts
    check.seconds = round(time.perf_counter() - start, 1)
    if device == "cuda":
        check.peak_gpu_memory_gib = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    log.info("merge check %s", summary_line(check))
    if not check.passed:
        raise MergeCheckFailed(f"merge check failed ({dtype_name}, {base} base): " + "; ".join(check.failures) +
                               "; the merged model was not written", check)
    save_merged(merged, tokenizer, adapter, target, check)
    log.info("merged model saved to %s", target)
    return target


# ----------------------------------------------------------------------------------------------- choices


def resolve_merge_dtype(recipe: Recipe, dtype: str | None) -> torch.dtype:
    if dtype is None:
        return resolve_dtype(recipe.model.dtype, "model.dtype")
    if dtype not in MERGE_DTYPES:
        raise QloraKitError(f"--dtype: {dtype!r} is not one of {', '.join(MERGE_DTYPES)}")
    return resolve_dtype(dtype, "--dtype")


def resolve_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise QloraKitError(f"--device: {device!r} is not one of cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise QloraKitError("--device cuda: no CUDA GPU is visible to torch here; use --device cpu")
    return device


def check_base_choice(recipe: Recipe, base: str) -> None:
    if base not in BASES:
        raise QloraKitError(f"--base: {base!r} is not one of {', '.join(BASES)}")
    if base == "dequantized" and not recipe.quantization.load_in_4bit:
        kind = "LLM.int8 (quantization.load_in_8bit)" if recipe.quantization.load_in_8bit else "an unquantized base"
        raise QloraKitError(f"--base dequantized: {recipe.source} trained on {kind}, not a 4-bit base; the weights "
                            "it trained on are the original ones, use --base original")


def dtype_label(dtype: torch.dtype) -> str:
    return next(name for name, d in MERGE_DTYPES.items() if d is dtype)


# ----------------------------------------------------------------------------------------------- the merge


def merge_layerwise(recipe: Recipe, folder: str, adapter: Path, dtype: torch.dtype, device: str,
                    dequantized: QuantizedBase | None) -> tuple[torch.nn.Module, list[str], list[str]]:
    """The merged model in `dtype`, holding at most one layer in fp32 beyond the base as stored on disk.

    The base loads in its checkpoint dtype; each LoRA layer's weight is made fp32 (the original, or its NF4 round trip
    when `dequantized` is given), merged by peft on `device`, and cast to `dtype` at once. Returns the model and the
    names of layers whose merged weights do not fit in `dtype` (inf after the cast) and of LoRA layers peft did not
    merge (a layer whose adapter is too small to show in the logits must still not ship unmerged).
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = AutoModelForCausalLM.from_pretrained(folder, revision=recipe.model.revision, dtype="auto",
                                                 trust_remote_code=recipe.model.trust_remote_code, device_map="cpu")
    peft_model = PeftModel.from_pretrained(model, adapter)
    adapted = {name.removeprefix("base_model.model."): module for name, module in peft_model.named_modules()
               if isinstance(module, LoraLayer)}
    for name, module in adapted.items():
        quantized = dequantized is not None and name in dequantized.layers
        weight = dequantized.weight(name, module.get_base_layer()) if quantized else None
        merge_layer(module, dtype, device, weight)
    unmerged = [name for name, module in adapted.items() if not module.merged]
    merged = peft_model.unload()
    if dequantized is not None:  # layers the 4-bit base quantized but LoRA did not adapt
        for name in sorted(dequantized.layers.keys() - adapted.keys()):
            layer = merged.get_submodule(name)
            layer.weight.data = dequantized.weight(name, layer).to(dtype)
    merged.to(dtype)
    overflowed = [name for name, p in merged.named_parameters() if not torch.isfinite(p).all()]
    return merged, overflowed, unmerged


def merge_layer(module, dtype: torch.dtype, device: str, weight: torch.Tensor | None = None) -> None:
    """Merge one LoRA layer: its weight (or `weight`) in fp32 on `device` -> peft's merge -> cast to `dtype`, CPU.

    peft offers merge_and_unload(safe_merge=True), which adds the delta in the weight's own dtype for the whole model
    at once; we want fp32 arithmetic with one fp32 layer alive, so we call LoraLayer.merge(safe_merge=True) (which
    also does DoRA's and rslora's math) on one upcast layer at a time, then unload(). A LoRA on a parameter (peft's
    ParamWrapper: MoE experts' 3-D weights, which peft's all-linear adapts through target_parameters) merges into the
    parameter it names, not `weight`. Checked against peft 0.21.2.
    """
    layer = module.get_base_layer()
    merged_into = [getattr(module, "parameter_name", None) or "weight", "bias"]
    parameters = [getattr(layer, name) for name in merged_into if getattr(layer, name, None) is not None]
    if weight is not None:
        parameters[0].data = weight
    for parameter in parameters:
        parameter.data = parameter.data.to(device=device, dtype=torch.float32)
    module.to(device)
    try:
        module.merge(safe_merge=True)
    except ValueError as exc:  # safe_merge found NaN/inf in the fp32 result: the adapter itself is broken
        raise QloraKitError(f"merge: {exc}") from None
    for parameter in parameters:
        parameter.data = parameter.data.to(dtype).cpu()
    module.to("cpu")


# ------------------------------------------------------------------------------------- the 4-bit base as trained


class QuantizedBase:
    """The base exactly as training quantized it (same loader, BitsAndBytesConfig and compute dtype), kept 4-bit."""

    def __init__(self, recipe: Recipe, folder: str) -> None:
        import bitsandbytes as bnb

        from qlora_kit.model import load_base_model

        compute_dtype = resolve_dtype(recipe.quantization.compute_dtype, "quantization.compute_dtype")
        model = load_base_model(recipe, folder, compute_dtype)
        # only the packed 4-bit layers are kept: the embeddings and norms it also holds are the original ones
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}

    def weight(self, name: str, layer: torch.nn.Module | None = None) -> torch.Tensor:
        """dequantize(NF4(W)) of one layer in fp32 on the CPU: the weight the 4-bit layer multiplied by in training,
        [out, in] as bitsandbytes stores every layer, or in the layout of `layer` (the full-precision model's own:
        GPT-2's Conv1D keeps [in, out])."""
        import bitsandbytes.functional as bnbf
        from transformers.pytorch_utils import Conv1D

        weight = self.layers[name].weight
        weight = bnbf.dequantize_4bit(weight.data, weight.quant_state).float().cpu()
        return weight.t().contiguous() if isinstance(layer, Conv1D) else weight


def load_trained_quantized_base(recipe: Recipe, folder: str) -> QuantizedBase | None:
    """None for a run without a 4-bit base: the model it trained is then the full-precision base + adapter."""
    if recipe.quantization.load_in_4bit:
        return QuantizedBase(recipe, folder)
    log.info("merge check: the run trained on %s, so the trained model is the full-precision base + adapter",
             "an LLM.int8 base (no weight-only round trip to compare with)" if recipe.quantization.load_in_8bit
             else "an unquantized base")
    return None


# ------------------------------------------------------------------------------------------------- the check


@dataclass
class References:
    """Unmerged fp32 logits over the check tokens: what an honest merge must reproduce."""

    base_fp32: torch.Tensor  # the full-precision base alone
    full_precision: torch.Tensor  # full-precision base + adapter
    trained: torch.Tensor | None  # dequantize(NF4(W)) base + adapter: the model trained; None without a 4-bit base


def reference_logits(recipe: Recipe, folder: str, adapter: Path, quantized: QuantizedBase | None,
                     inputs: dict[str, torch.Tensor], device: str) -> References:
    """One fp32 copy of the base, adapter unmerged: the base alone, with the adapter, then with its 4-bit weights.

    On a CPU with fp32 compute a bitsandbytes Linear4bit computes exactly x @ dequantize(W).T, so the swapped model is
    the trained model; with bf16/fp16 compute it is the trained model without that compute rounding.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = AutoModelForCausalLM.from_pretrained(folder, revision=recipe.model.revision, dtype=torch.float32,
                                                 trust_remote_code=recipe.model.trust_remote_code, device_map="cpu")
    peft_model = PeftModel.from_pretrained(model, adapter)
    with peft_model.disable_adapter():
        base = logits_on(peft_model, inputs, device)
    full_precision = logits_on(peft_model, inputs, device)
    trained = None
    if quantized is not None:
        plain = peft_model.get_base_model()
        for name in quantized.layers:
            layer = plain.get_submodule(name)
            layer = layer.get_base_layer() if isinstance(layer, LoraLayer) else layer
            layer.weight.data = quantized.weight(name, layer)
        trained = logits_on(peft_model, inputs, device)
    del peft_model, model
    release_memory()
    return References(base, full_precision, trained)


def base_logits_in(recipe: Recipe, folder: str, dtype: torch.dtype, inputs: dict[str, torch.Tensor],
                   device: str) -> torch.Tensor:
    """The base alone, loaded in `dtype`: its distance from the fp32 base is what rounding to `dtype` costs."""
    model = AutoModelForCausalLM.from_pretrained(folder, revision=recipe.model.revision, dtype=dtype,
                                                 trust_remote_code=recipe.model.trust_remote_code, device_map="cpu")
    logits = logits_on(model, inputs, device)
    del model
    release_memory()
    return logits


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_inputs(tokenizer: PreTrainedTokenizerBase, recipe: Recipe) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The check prompts (chat-formatted, generation prompt added) and a few held-out rows with their answers."""
    from qlora_kit.data import render, tokenize_row

    sequences = [tokenizer(render(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True),
                           add_special_tokens=False).input_ids for p in CHECK_PROMPTS]
    rows = heldout_check_rows(recipe)
    sequences += [tokenize_row(tokenizer, row, recipe.data.loss_on)["input_ids"][:CHECK_MAX_TOKENS] for row in rows]
    width = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    return {"input_ids": ids, "attention_mask": mask}, {"check_prompts": len(CHECK_PROMPTS), "heldout_rows": len(rows)}


def heldout_check_rows(recipe: Recipe) -> list[dict]:
    from qlora_kit.evaluate import heldout_rows

    if recipe.data.validation is None:
        log.info("merge check: the run has no held-out split (data.validation); checking on the check prompts only")
        return []
    try:
        rows, _ = heldout_rows(recipe, None)
    except QloraKitError as exc:
        log.warning("merge check: the run's held-out rows cannot be read (%s); checking on the check prompts only",
                    exc)
        return []
    return rows[:CHECK_HELDOUT_ROWS]


@contextmanager
def placed_on(model: torch.nn.Module, device: str) -> Iterator[str]:
    """Run a forward pass on `device` when the whole model fits in the GPU's free memory, else on the CPU (logged)."""
    if device == "cpu":
        yield "cpu"
        return
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    free, _ = torch.cuda.mem_get_info()
    if size > 0.8 * free:
        log.info("merge check: a %.1f GiB model does not fit in the GPU's %.1f GiB free; its forward pass runs on "
                 "the CPU", size / 2**30, free / 2**30)
        yield "cpu"
        return
    model.to(device)
    try:
        yield device
    finally:
        model.to("cpu")
        torch.cuda.empty_cache()


@torch.no_grad()
def logits_on(model: torch.nn.Module, inputs: dict[str, torch.Tensor], device: str) -> torch.Tensor:
    """fp32 logits of every real (unpadded) token, on the CPU: (tokens, vocab)."""
    model.eval()
    with placed_on(model, device) as where:
        logits = model(**{k: v.to(where) for k, v in inputs.items()}).logits
        return logits[inputs["attention_mask"].bool().to(where)].float().cpu()


def agreement(reference: torch.Tensor, other: torch.Tensor) -> Agreement:
    top1 = (reference.argmax(-1) == other.argmax(-1)).float().mean().item()
    if not torch.isfinite(other).all():
        return Agreement(top1, None, None)
    kl = torch.cat([torch.nn.functional.kl_div(o.double().log_softmax(-1), r.double().log_softmax(-1),
                                               log_target=True, reduction="none").sum(-1)
                    for r, o in zip(reference.split(256), other.split(256), strict=True)])
    return Agreement(top1, kl.mean().item(), (reference - other).abs().max().item())


def judge(references: References, base_in_dtype: torch.Tensor, merged: torch.Tensor, dtype: torch.dtype, base: str,
          device: str, margin: float, overflowed: list[str], unmerged: list[str]) -> MergeCheck:
    """Pass unless the merge itself is wrong: its error against the unmerged fp32 model on the same base must stay
    within `margin` x the error rounding the base alone to `dtype` makes (logits; margin^2 for KL, which is quadratic
    in the logit error), or a few fp32 epsilons of summation order where that is zero."""
    name = dtype_label(dtype)
    same_base = references.trained if base == "dequantized" else references.full_precision
    rounding = agreement(same_base, merged)
    budget = agreement(references.base_fp32, base_in_dtype)
    floor = FP32_FLOOR_EPS * torch.finfo(torch.float32).eps * references.full_precision.abs().max().item()
    allowed_max = margin * max(budget.max_abs_logit_diff or 0.0, floor)
    allowed_kl = margin**2 * max(budget.mean_kl or 0.0, floor**2 / 2)
    failures = []
    if unmerged:
        failures.append(f"{len(unmerged)} LoRA layer(s) were not merged: {', '.join(unmerged[:3])}")
    if overflowed:
        failures.append(f"{len(overflowed)} merged weight(s) do not fit in {name} (largest finite value "
                        f"{torch.finfo(dtype).max:.3g}): {', '.join(overflowed[:3])}; merge with --dtype bf16 or fp32")
    elif rounding.max_abs_logit_diff is None:
        failures.append(f"the merged model's logits overflow {name} (inf/nan) although every weight fits; merge with "
                        "--dtype bf16 or fp32")
    elif rounding.max_abs_logit_diff > allowed_max or rounding.mean_kl > allowed_kl:
        failures.append(
            f"the merged model differs from the unmerged fp32 adapter model on the {base} base by max |logit diff| "
            f"{rounding.max_abs_logit_diff:.3g} (allowed {allowed_max:.3g}) and mean KL {rounding.mean_kl:.3g} "
            f"(allowed {allowed_kl:.3g}), beyond {margin:g}x what rounding to {name} alone explains (the base alone "
            f"in {name} vs fp32: max {budget.max_abs_logit_diff:.3g}, KL {budget.mean_kl:.3g}); the merge itself is "
            "wrong (a LoRA scale, or a layer left unmerged)")
    return MergeCheck(
        dtype=name, base=base, device=device, tokens=0, inputs={},
        merged_vs_trained=agreement(references.trained, merged) if references.trained is not None else None,
        merged_vs_full_precision=agreement(references.full_precision, merged), merge_rounding=rounding,
        quantization=(agreement(references.full_precision, references.trained)
                      if references.trained is not None else None),
        rounding_budget=budget, margin=margin,
        allowed={"max_abs_logit_diff": allowed_max, "mean_kl": allowed_kl}, passed=not failures, failures=failures)


def describe(a: Agreement | None) -> str:
    if a is None:
        return "n/a"
    if a.mean_kl is None:
        return f"top-1 {100 * a.top1_agreement:.1f}%, logits not finite"
    return f"top-1 {100 * a.top1_agreement:.1f}%, KL {a.mean_kl:.2e}, max |logit diff| {a.max_abs_logit_diff:.3g}"


def summary_line(check: MergeCheck) -> str:
    return (f"({check.dtype}, {check.base} base, {check.tokens} tokens) {'passed' if check.passed else 'FAILED'}: "
            f"vs the trained 4-bit model {describe(check.merged_vs_trained)}; of which merge rounding "
            f"{describe(check.merge_rounding)} (budget: {check.margin:g}x {describe(check.rounding_budget)}) and 4-bit "
            f"base {describe(check.quantization)}")


def save_merged(merged, tokenizer, adapter: Path, target: Path, check: MergeCheck) -> None:
    with atomic_folder(target) as partial:
        merged.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        if (adapter / "generation_config.json").is_file():
            shutil.copy(adapter / "generation_config.json", partial / "generation_config.json")
        write_atomically(partial / "merge_check.json", json.dumps(asdict(check), indent=2) + "\n")
