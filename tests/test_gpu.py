"""CUDA-only behaviour: the 4-bit pipeline on a GPU picks bf16, keeps the whole model on the GPU, and exports a merged
model that computes what base + adapter computed. Run through the device tool: `pytest -m gpu tests/test_gpu.py`.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from conftest import nonzero_lora_b

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle", "forest", "rocket"]
PROMPT_WORDS = ["please", "repeat", "the", "words"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-64 random Llama with a word-level ChatML tokenizer, saved like a Hub checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama-gpu")
    specials = ["[UNK]", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    vocab = [*specials, "user", "assistant", "system", ".", ",", "?", "'", *PROMPT_WORDS, *WORDS,
             *(w.upper() for w in WORDS)]
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="<|pad|>",
                                        bos_token="<|im_start|>", eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    save_random_llama(folder, tokenizer, hidden_size=64, intermediate_size=128, num_attention_heads=4)
    return folder


def save_random_llama(folder: Path, tokenizer, **sizes: int) -> None:
    """A 2-layer random Llama of the given sizes with `tokenizer`, saved to `folder` like a Hub checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer.save_pretrained(folder)
    config = LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 rows of 'repeat the words X Y' -> 'X Y' in capitals."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("gpu-data") / "shout.jsonl"
    with path.open("w") as handle:
        for _ in range(32):
            pair = rng.sample(WORDS, 2)
            messages = [{"role": "user", "content": f"please repeat the words {pair[0]} {pair[1]}."},
                        {"role": "assistant", "content": f"{pair[0].upper()} {pair[1].upper()}"}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def write_recipe(folder: Path, model: Path, data: Path) -> Path:
    """Defaults wherever the GPU path differs from the CPU one: compute dtype, optimizer and model dtype on `auto`."""
    recipe = {
        "model": {"name": str(model)},
        "quantization": {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"},
        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
        "data": {"datasets": [{"path": str(data)}]},
        "training": {"output_dir": str(folder / "outputs"), "run_name": "gpu", "max_steps": 4, "batch_size": 4,
                     "max_length": 64, "gradient_checkpointing": True, "logging_steps": 1, "learning_rate": 1e-3,
                     "warmup": 0},
        "evaluation": {"metric": "none"},
        "export": {"merge": True},
    }
    path = folder / "gpu.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@contextmanager
def qlora_kit_log() -> Iterator[list[str]]:
    """Messages of the `qlora_kit` logger at INFO, whether or not the CLI has turned its propagation off."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("qlora_kit")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_cuda_run_picks_bf16_saves_adapter_and_merges_within_tolerance(
        tmp_path: Path, tiny_base: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qlora_kit.pipeline import run_training
    from qlora_kit.recipe import load_recipe

    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(write_recipe(tmp_path, tiny_base, chat_file))
    torch.cuda.reset_peak_memory_stats()
    with qlora_kit_log() as messages:
        summary = run_training(recipe)

    assert "compute dtype: bfloat16" in messages
    plan = [m for m in messages if m.startswith("speed plan:")]  # one block, with why each choice was made
    assert len(plan) == 1 and "  - training.optimizer: auto -> adamw_torch_fused (fp32 optimizer states 0.00 GiB" in \
        plan[0], messages
    run_dir = recipe.run_dir
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    check = json.loads((run_dir / "merged" / "merge_check.json").read_text())
    assert check["passed"] and (check["dtype"], check["device"]) == ("bf16", "cuda")  # within the bf16 budget
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["global_step"] == 4
    assert saved["speed_plan"]["optimizer"] == "adamw_torch_fused" and saved["speed_plan"]["machine"]["gpus"] >= 1
    assert 0 < saved["peak_gpu_memory_gib"] < 4
    assert saved["train_tokens_per_second"] > 0


@pytest.mark.parametrize("base", ["original", "dequantized"])
def test_bf16_merge_on_cuda_passes_matches_the_cpu_merge_and_records_peak_gpu_memory(
        tmp_path: Path, tiny_base: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch, base: str,
        record_property) -> None:
    from safetensors.torch import load_file

    from qlora_kit.export import merge_adapter
    from qlora_kit.pipeline import run_training
    from qlora_kit.recipe import load_recipe

    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path / "cache"))
    recipe_file = write_recipe(tmp_path, tiny_base, chat_file)
    recipe = load_recipe(recipe_file, ["export.merge=false", "export.report=false", "training.learning_rate=1e-2"])
    run_training(recipe)

    on_gpu = merge_adapter(recipe.run_dir, out=tmp_path / "cuda", dtype="bf16", base=base, device="cuda")
    on_cpu = merge_adapter(recipe.run_dir, out=tmp_path / "cpu", dtype="bf16", base=base, device="cpu")

    check = json.loads((on_gpu / "merge_check.json").read_text())
    record_property("merge_check", check)
    assert check["passed"] and (check["dtype"], check["device"], check["base"]) == ("bf16", "cuda", base)
    assert 0 < check["peak_gpu_memory_gib"] < 1
    gpu, cpu = load_file(on_gpu / "model.safetensors"), load_file(on_cpu / "model.safetensors")
    assert gpu.keys() == cpu.keys()
    for name in gpu:  # fp32 sums in another order, one rounding to bf16: at most one bf16 step apart
        assert gpu[name].dtype is torch.bfloat16
        assert torch.allclose(gpu[name].float(), cpu[name].float(), rtol=2**-7, atol=0), name


def test_fused_mlp_runs_in_training_with_liger_s_kernels_on(
        tmp_path: Path, tiny_base: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Liger's SwiGLU replaces each MLP's forward (inside `train()` on transformers 5.17); the fused MLP must still be
    the one that runs, or it saves no memory."""
    from qlora_kit.pipeline import run_training
    from qlora_kit.recipe import load_recipe
    from qlora_kit.speed.lora_autograd import GatedDownOver4bit

    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(write_recipe(tmp_path, tiny_base, chat_file),
                         ["speed.fused_mlp=true", "speed.keep_activations_layers=0", "export.merge=false",
                          "speed.cuda_graphs=false"])  # graph replays run no Python: calls counted without them
    assert recipe.speed.liger_kernels
    fused_calls = []
    fused_forward = GatedDownOver4bit.forward
    monkeypatch.setattr(GatedDownOver4bit, "forward",
                        staticmethod(lambda *args: fused_calls.append(1) or fused_forward(*args)))
    with qlora_kit_log() as messages:
        run_training(recipe)

    assert "speed.fused_mlp: 2 gated MLPs recompute act(gate) * up in backward" in messages
    assert len(fused_calls) == 4 * 2 * 2  # 4 steps x 2 MLPs x (forward + checkpointed recompute)


@pytest.mark.parametrize("shape", [(384, 256), (1, 4095)])  # the second: an odd count, half a byte of padding
@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_dequantize_gives_bitsandbytes_own_bits(shape: tuple[int, int], blocksize: int, double_quant: bool,
                                                       dtype: torch.dtype) -> None:
    import bitsandbytes as bnb

    from qlora_kit.speed.nf4_triton import nf4_dequantize, nf4_dequantize_applies

    torch.manual_seed(0)
    weight = torch.randn(shape, device="cuda", dtype=dtype) * 3
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant,
                                                 quant_type="nf4")
    assert nf4_dequantize_applies(packed, state)
    expected = bnb.functional.dequantize_4bit(packed, state)
    padded = torch.full((shape[0] * shape[1] + 1,), float("nan"), device="cuda", dtype=dtype)
    dense = nf4_dequantize(packed, state, out=padded[:-1].view(shape))
    assert torch.equal(dense, expected)
    assert padded[-1].isnan()  # nothing written past the last weight
    assert not nf4_dequantize_applies(*bnb.functional.quantize_4bit(weight, quant_type="fp4"))


def test_fp32_adapter_gradients_come_out_of_the_matmul_unrounded() -> None:
    """An fp32 LoRA weight's gradient from bf16 activations: one GEMM straight to fp32, closer to the exact product
    than the bf16 product cast up (what a matmul then a cast gives)."""
    from qlora_kit.speed.lora_autograd import matmul_into

    torch.manual_seed(0)
    grad_out, saved = (torch.randn(4096, 16, device="cuda", dtype=torch.bfloat16),
                       torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16))
    exact = grad_out.t().double() @ saved.double()
    grad = matmul_into(grad_out.t(), saved, torch.float32)
    assert grad.dtype == torch.float32
    rounded_error = ((grad_out.t() @ saved).double() - exact).abs().max()
    assert (grad.double() - exact).abs().max() < rounded_error / 10
    assert matmul_into(grad_out.t(), saved, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("optimizer", ["adamw_torch_fused", "paged_adamw_8bit"])
def test_adapter_casts_kept_between_optimizer_steps_train_exactly_like_casting_every_call(
        tmp_path: Path, tiny_base: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch, optimizer: str) -> None:
    """The fused layers reuse one bf16 copy of each fp32 adapter weight until the next optimizer step. A stale copy
    would train on old weights: the loss curve would part from casting in every call after the first step."""
    import qlora_kit.speed.lora_autograd
    from qlora_kit.pipeline import run_training
    from qlora_kit.recipe import load_recipe

    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path / "cache"))

    def losses(run_name: str) -> list[float]:
        recipe = load_recipe(write_recipe(tmp_path, tiny_base, chat_file),
                             [f"training.optimizer={optimizer}", f"training.run_name={run_name}", "export.merge=false",
                              "training.learning_rate=0.01",
                              # auto times cuDNN's and flash attention in each run and may pick either: their
                              # rounding differs from the first step on (seen on an H200, 2026-12-01)
                              "speed.attention_kernel=default"])
        run_training(recipe)
        rows = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
        return [row["loss"] for row in rows if "loss" in row]

    cached = losses("cached")
    monkeypatch.setattr(qlora_kit.speed.lora_autograd, "in_compute_dtype",
                        lambda weight, dtype, cast_once=True: weight.to(dtype))
    every_call = losses("every-call")

    assert len(cached) == 4 and abs(cached[-1] - cached[0]) > 0.05  # four steps that move the loss
    assert cached == pytest.approx(every_call, abs=1e-4)  # run-to-run noise only (GPU kernels are not bitwise)


def test_quantized_model_sits_whole_on_cuda0_without_offload(
        tmp_path: Path, tiny_base: Path, chat_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bitsandbytes as bnb

    from qlora_kit.model import build_quantized_model, device_map_for_this_process
    from qlora_kit.recipe import load_recipe

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert device_map_for_this_process() == {"": 0}
    recipe = load_recipe(write_recipe(tmp_path, tiny_base, chat_file))
    model = build_quantized_model(recipe, str(tiny_base), torch.bfloat16)

    base = model.get_base_model()
    assert base.is_loaded_in_4bit
    cuda0 = torch.device("cuda", 0)
    # accelerate records hf_device_map only when it dispatched over several devices; one device means none
    device_map = getattr(base, "hf_device_map", {"": base.device})
    assert not {"cpu", "disk"} & {str(d) for d in device_map.values()}, device_map
    assert {p.device for p in model.parameters()} == {cuda0}
    assert {b.device for b in model.buffers()} <= {cuda0}
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    for layer in quantized:
        assert layer.weight.dtype == torch.uint8 and layer.weight.quant_state is not None
        assert layer.weight.quant_state.absmax.device == cuda0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("launcher", ["ddp", "fsdp_qlora"])
def test_accelerate_launch_on_two_gpus_saves_a_complete_adapter(
        launcher: str, tmp_path: Path, tiny_base: Path, chat_file: Path) -> None:
    """`accelerate launch --config_file recipes/accelerate/X.yaml train.py RECIPE` as the README says: both ranks
    train, rank 0 writes one standard PEFT adapter holding every LoRA matrix (FSDP gathers them from the shards)."""
    import os
    import subprocess
    import sys

    from safetensors import safe_open

    root = Path(__file__).resolve().parent.parent
    recipe = write_recipe(tmp_path, tiny_base, chat_file)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(root / "recipes" / "accelerate" / f"{launcher}.yaml"), "--num_processes", "2",
               str(root / "train.py"), str(recipe), "export.merge=false"]
    if launcher == "fsdp_qlora":
        command.append("quantization.quant_storage=bf16")
    env = {**os.environ, "QLORA_KIT_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run_dir = tmp_path / "outputs" / "gpu"
    with safe_open(str(run_dir / "adapter" / "adapter_model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
        assert len(keys) == 2 * 7 * 2  # lora_A and lora_B of 7 linears in each of 2 layers
        assert any(handle.get_tensor(k).abs().sum() > 0 for k in keys if "lora_B" in k)  # trained, not the init
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2, 3, 4]  # rank 0 logs once per step, not per rank


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """tiny_base's tokenizer on a wider random Llama (hidden 512): matmuls long enough for bf16 rounding to show."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("wide-llama-gpu")
    save_random_llama(folder, AutoTokenizer.from_pretrained(tiny_base), hidden_size=512, intermediate_size=1536,
                      num_attention_heads=8)
    return folder


def one_step_gradients(recipe, folder: Path, liger: bool, fused: bool, compiled: bool = False,
                       mlp: bool = False, fused_counts: tuple[int, int] = (14, 2)
                       ) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of one bf16-autocast step, the way the trainer runs it (checkpointing on; compiled:
    the last layer keeps its activations, so both compiled graphs run)."""
    from qlora_kit.model import build_quantized_model
    from qlora_kit.speed.patches import (
        compile_decoder_layers,
        keep_activations,
        keep_adapter_weights_in_fp32,
        use_fused_lora,
        use_fused_mlp,
    )

    torch.manual_seed(0)
    model = build_quantized_model(recipe, str(folder), torch.bfloat16)
    keep_adapter_weights_in_fp32(model)
    nonzero_lora_b(model, 0.02)
    if liger:
        import sys

        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        # Liger also swaps the modelling module's norm class and RoPE function for its own, module-wide: put them
        # back afterwards, or every model built later in this process (a compiled run) would trace Liger's kernels
        modeling = sys.modules[type(model.get_base_model()).__module__]
        module_before = dict(vars(modeling))
        _apply_liger_kernel_to_instance(model=model.get_base_model())
    if fused:
        assert use_fused_lora(model) == fused_counts[0]
    if mlp:  # act(gate) * up recomputed in backward, through Liger's kernels when liger is on
        assert use_fused_mlp(model) == fused_counts[1]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compiled:
        keep_activations(model, 1)
        assert compile_decoder_layers(model) == 2
    model.train()
    ids = torch.randint(4, 30, (3, 128), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if liger:
        for name, value in module_before.items():
            setattr(modeling, name, value)
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("setting", ["fused", "fused+liger", "fused+liger+bf16-residual",
                                     "fused+mlp+liger+bf16-residual", "fused+compiled+bf16-residual"])
def test_speedups_give_peft_s_gradients_to_bf16_tolerance(
        setting: str, tmp_path: Path, wide_base: Path, chat_file: Path) -> None:
    """One step of the plain path (peft's LoRA, fp32 residual, no Liger) against each speed setting: same loss,
    same LoRA gradients up to bf16 rounding (relative error of each gradient tensor, by norm)."""
    from qlora_kit.recipe import load_recipe

    plain_recipe = load_recipe(write_recipe(tmp_path, wide_base, chat_file), ["quantization.upcast_to_fp32=true"])
    fast_recipe = load_recipe(write_recipe(tmp_path, wide_base, chat_file),
                              [f"quantization.upcast_to_fp32={'bf16-residual' not in setting}"])
    plain_loss, plain = one_step_gradients(plain_recipe, wide_base, liger=False, fused=False)
    fast_loss, fast = one_step_gradients(fast_recipe, wide_base, liger="liger" in setting, fused=True,
                                         compiled="compiled" in setting, mlp="mlp" in setting)
    assert abs(fast_loss - plain_loss) / plain_loss < 1e-2
    assert plain.keys() == fast.keys() and len(plain) == 2 * 2 * 7
    errors = {name: ((fast[name] - plain[name]).norm() / plain[name].norm()).item() for name in plain}
    print(f"{setting}: loss {plain_loss:.5f} -> {fast_loss:.5f}, max relative gradient error "
          f"{max(errors.values()):.2e} ({max(errors, key=errors.get)})")
    assert all(plain[name].norm() > 0 for name in plain)
    assert max(errors.values()) < 3e-2, errors


# (LoRA layers, MLPs) fused in each family's 2-layer shape (tests/test_speed.py FUSED_PER_FAMILY)
FAMILY_FUSED = {"tiny": (14, 2), "tiny-qwen2.5": (14, 2), "tiny-qwen3": (14, 2), "tiny-mistral": (14, 2),
                "tiny-gemma-2": (14, 2), "tiny-gemma-3": (14, 2), "tiny-phi-4-mini": (8, 2), "tiny-smollm2": (14, 2)}


def save_family_model(shape: str, tmp_path: Path, tiny_base: Path) -> tuple[Path, str]:
    """A random model of the family's own config class (scripts/bench_common.py), 512 wide with an MLP 1,184 wide,
    with tiny_base's tokenizer, saved under tmp_path; and the recipe override for the family's attention."""
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from bench_common import SHAPES, attention, shape_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    spec = SHAPES[shape]
    sizes = dict(hidden_size=512, intermediate_size=1184, num_attention_heads=8,
                 num_key_value_heads=8 if spec["num_key_value_heads"] == spec["num_attention_heads"] else 4)
    if "head_dim" in spec:
        sizes["head_dim"] = 64
    config, _ = shape_config(shape, tokenizer, vocab_size=len(tokenizer), **sizes)
    folder = tmp_path / shape
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, f"model.attn_implementation={attention(shape)}"


@pytest.mark.parametrize("shape", list(FAMILY_FUSED))
def test_every_family_gets_peft_s_gradients_through_the_fused_layers_and_liger(
        shape: str, tmp_path: Path, tiny_base: Path, chat_file: Path) -> None:
    """Each family's own config class (scripts/bench_common.py), 512 wide with an MLP 1,184 wide (not a power of two,
    like Qwen2.5's 18,944: Liger's SwiGLU / GEGLU run over 4,096-element rows): the fused LoRA layers, fused MLP
    (SiLU- or tanh-GELU-gated) and Liger's kernels in bf16 give the plain path's loss and LoRA gradients to bf16
    tolerance."""
    from qlora_kit.recipe import load_recipe

    folder, attn = save_family_model(shape, tmp_path, tiny_base)
    plain_recipe = load_recipe(write_recipe(tmp_path, folder, chat_file), [attn, "quantization.upcast_to_fp32=true"])
    fast_recipe = load_recipe(write_recipe(tmp_path, folder, chat_file), [attn, "quantization.upcast_to_fp32=false"])
    plain_loss, plain = one_step_gradients(plain_recipe, folder, liger=False, fused=False)
    # speed.compile_layers (auto: the families without a fused MLP; true: any), whose layers run peft's LoRA ops and
    # their MLP's own forward
    compiled_run = one_step_gradients(fast_recipe, folder, liger=False, fused=True, compiled=True,
                                      fused_counts=FAMILY_FUSED[shape])
    fast_loss, fast = one_step_gradients(fast_recipe, folder, liger=True, fused=True, mlp=True,
                                         fused_counts=FAMILY_FUSED[shape])
    # the bf16 residual alone (peft's path, no fused layers, no Liger): the rounding every bf16 setting pays. Gemma 3
    # scales its embeddings by sqrt(hidden) and sits at ~3.7e-2 on the H200 with the fused path, where the others
    # stay under 3e-2; an error of the fused layers themselves would be orders of magnitude above it.
    _, rounded = one_step_gradients(fast_recipe, folder, liger=False, fused=False)
    assert abs(fast_loss - plain_loss) / plain_loss < 1e-2
    assert plain.keys() == fast.keys() and all(plain[name].norm() > 0 for name in plain)

    def relative(grads: dict[str, torch.Tensor]) -> dict[str, float]:
        return {name: ((grads[name] - plain[name]).norm() / plain[name].norm()).item() for name in plain}

    errors, floor = relative(fast), max(relative(rounded).values())
    print(f"{shape}: loss {plain_loss:.5f} -> {fast_loss:.5f}, max relative gradient error "
          f"{max(errors.values()):.2e} ({max(errors, key=errors.get)}); bf16 residual alone {floor:.2e}")
    assert max(errors.values()) < max(3e-2, 2 * floor), errors
    compiled_loss, compiled = compiled_run
    errors = relative(compiled)
    print(f"{shape} compiled: loss {compiled_loss:.5f}, max relative gradient error {max(errors.values()):.2e}")
    assert abs(compiled_loss - plain_loss) / plain_loss < 1e-2
    assert max(errors.values()) < max(3e-2, 2 * floor), errors


@pytest.mark.parametrize(("activation", "width"), [("silu", 18944), ("gelu_tanh", 14336)])  # Qwen2.5-7B, Gemma-2-9B
def test_liger_gate_kernels_over_4096_element_rows_give_their_own_bits_at_the_real_width(activation: str,
                                                                                        width: int) -> None:
    """gated_mul / gated_mul_backward hand Liger's SwiGLU and GEGLU kernels rows of 4,096 elements instead of
    18,944- or 14,336-wide ones: the op is elementwise, so the bits are Liger's own at the real width; and the
    torch-ops version (CPU, no liger-kernel) stays within a bf16 rounding of them."""
    ops = pytest.importorskip("liger_kernel.ops")
    from qlora_kit.speed.lora_autograd import gated_mul, gated_mul_backward

    forward, backward = {"silu": (ops.swiglu_forward, ops.swiglu_backward),
                         "gelu_tanh": (ops.geglu_forward, ops.geglu_backward)}[activation]
    gate, up, grad = (torch.randn(2, 2048, width, device="cuda", dtype=torch.bfloat16,
                                  generator=torch.Generator("cuda").manual_seed(i)) for i in range(3))
    product = gated_mul(gate, up, activation)
    assert torch.equal(product, forward(gate.clone(), up.clone())[2])
    ours = gated_mul_backward(gate.clone(), up.clone(), grad, activation)
    theirs = backward(gate.clone(), up.clone(), grad.clone())
    assert all(torch.equal(a, b) and a.shape == gate.shape for a, b in zip(ours, theirs, strict=True))
    act = {"silu": torch.nn.functional.silu,
           "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}[activation]
    torch.testing.assert_close(product, act(gate.float()).to(up.dtype) * up)  # what the MLP computes unfused


def test_triton_kernels_compile_in_the_first_two_steps_and_a_second_run_compiles_none(
        tmp_path: Path, tiny_base: Path, chat_file: Path) -> None:
    """Time to first step: every Triton kernel (qlora-kit's NF4 dequantize, Liger's) compiles within the two warm-up
    steps MetricsLog leaves out of tokens/s, lands in Triton's on-disk cache, and a second process of the same shape
    compiles nothing; the summary says how long the first step and the model load took."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "triton"
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache), "QLORA_KIT_CACHE": str(tmp_path / "cache")}
    recipe = write_recipe(tmp_path, tiny_base, chat_file)

    def train(steps: int) -> tuple[int, dict]:
        done = subprocess.run([sys.executable, "-m", "qlora_kit", "train", str(recipe), f"training.max_steps={steps}",
                               "training.overwrite=true", "training.resume=never", "export.merge=false"],
                              cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        kernels = sum(1 for entry in cache.iterdir() if entry.is_dir())
        return kernels, json.loads((tmp_path / "outputs" / "gpu" / "summary.json").read_text())

    after_two, first = train(2)
    after_six, second = train(6)
    assert after_two > 0  # the NF4 kernel at least
    assert after_six == after_two  # steps 3-6 and the second process compiled nothing
    assert 0 < second["model_load_seconds"] < second["first_step_seconds"]
    assert second["first_step_seconds"] <= first["first_step_seconds"] + 5  # warm: no compile on the way


def test_attention_kernels_are_timed_on_the_gpu_and_flash_switches_cudnn_off() -> None:
    """Both of PyTorch's kernels time the Qwen2.5-7B attention call (GQA 28/4, biased projections) on this GPU; the
    choice is one of the two, and flash leaves PyTorch's cuDNN attention off for the process."""
    from torch.nn.attention import SDPBackend
    from transformers import Qwen2Config

    from qlora_kit.speed.attention import (
        AttentionShape,
        apply_attention_kernel,
        choose_attention_kernel,
        seconds_per_call,
    )

    shape = AttentionShape.of(Qwen2Config(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4),
                              2, 2048, torch.bfloat16)
    flash = seconds_per_call(shape, SDPBackend.FLASH_ATTENTION)
    cudnn = seconds_per_call(shape, SDPBackend.CUDNN_ATTENTION)
    print(f"Qwen2.5-7B attention, forward + backward: flash {flash}, cuDNN {cudnn} s")
    assert flash is not None and 0 < flash < 0.1 and (cudnn is None or 0 < cudnn < 0.1)
    notes: list[str] = []
    chosen = choose_attention_kernel("auto", shape, notes)
    assert chosen in ("default", "flash") and notes
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        apply_attention_kernel("flash")
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)


def test_flex_attention_trains_gemma2_to_eager_attention_s_loss_and_gradients() -> None:
    """speed.attention_kernel: flex on the GPU: a Gemma 2 model (soft cap 1 and window 8, both biting at 48-token
    rows, as in test_speed's forward check) gives eager attention's loss and every weight's gradient through flex
    attention's backward, in fp32."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    from qlora_kit.model import FLEX
    from qlora_kit.speed.attention import set_attention_implementation

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                          attn_logit_softcapping=1.0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").cuda().train()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
    ids = torch.randint(0, 256, (2, 48), device="cuda", generator=torch.Generator("cuda").manual_seed(1))

    def loss_and_gradients():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    eager_loss, eager_grads = loss_and_gradients()
    before = set_attention_implementation(model, FLEX)
    flex_loss, flex_grads = loss_and_gradients()
    set_attention_implementation(model, before)
    torch.testing.assert_close(flex_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(flex_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def orpo_step_peak_gib(tmp_path: Path, folder: Path, pairs: Path, trl_forward: bool, monkeypatch) -> float:
    """GiB allocated at the peak of one ORPO loss + backward on the first batch above what was allocated before it:
    qlora-kit's trainer (fused LM head), or with trl's own concatenated_forward (full logits)."""
    import gc

    from trl.experimental.orpo import ORPOTrainer

    from qlora_kit.data import build_datasets
    from qlora_kit.model import build_quantized_model, load_tokenizer
    from qlora_kit.recipe import load_recipe
    from qlora_kit.speed import Machine, decide_speed_plan
    from qlora_kit.trainers import build_trainer

    recipe = load_recipe(write_recipe(tmp_path, folder, pairs), [
        "method=orpo", "data.cache=false", "training.batch_size=4", "training.max_length=512",
        "speed.liger_kernels=false", f"training.output_dir={tmp_path / str(trl_forward)}"])
    tokenizer = load_tokenizer(recipe, str(folder))
    model = build_quantized_model(recipe, str(folder), torch.bfloat16)
    plan = decide_speed_plan(recipe, model.config, Machine.measure(), model.get_nb_trainable_parameters()[0])
    trainer = build_trainer(recipe, model, tokenizer, build_datasets(recipe, tokenizer), tmp_path / str(trl_forward),
                            torch.bfloat16, plan)
    if trl_forward:
        monkeypatch.setattr(type(trainer), "concatenated_forward", ORPOTrainer.concatenated_forward)
    trainer.model.gradient_checkpointing_enable(trainer.args.gradient_checkpointing_kwargs)
    trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    trainer.model.train()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    trainer.compute_loss(trainer.model, batch).backward()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30
    trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
    del trainer, model, batch
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def test_compiled_layers_recompute_the_same_lora_dropout_masks_on_cuda(tmp_path: Path, tiny_base: Path,
                                                                       chat_file: Path) -> None:
    """tests/test_speed.py's dropout-mask check on the GPU, where inductor draws its masks from the CUDA generator
    (philox): a compiled layer that checkpoints recomputes the masks it drew, so loss and gradients equal those of
    the compiled layer that keeps its activations, at the same seed."""
    from qlora_kit.model import build_quantized_model
    from qlora_kit.recipe import load_recipe
    from qlora_kit.speed.patches import compile_decoder_layers, keep_activations, use_fused_lora

    recipe = load_recipe(write_recipe(tmp_path, tiny_base, chat_file), ["lora.dropout=0.3"])
    model = nonzero_lora_b(build_quantized_model(recipe, str(tiny_base), torch.bfloat16), 0.02)
    use_fused_lora(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch._dynamo.reset()
    compile_decoder_layers(model)
    model.train()
    ids = torch.randint(4, 30, (2, 128), generator=torch.Generator().manual_seed(1)).cuda()

    def loss_and_gradients(seed: int):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    def error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
        return max(((grads[n] - g).norm() / g.norm()).item() for n, g in reference.items())

    keep_activations(model, 2)
    kept_loss, kept = loss_and_gradients(5)
    other_masks = error(loss_and_gradients(6)[1], kept)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert keep_activations(model, 0) == 2
    loss, grads = loss_and_gradients(5)
    print(f"recomputed: loss {kept_loss.item():.5f} -> {loss.item():.5f}, max relative gradient error "
          f"{error(grads, kept):.2e}; other masks {other_masks:.2e}")
    # the two compiled graphs may round differently in bf16; other masks move the gradients far more
    assert abs(loss - kept_loss).item() / kept_loss.item() < 1e-3
    assert error(grads, kept) < min(2e-2, other_masks / 10)


def test_an_orpo_step_through_the_fused_lm_head_peaks_below_trl_s_full_logit_step(
        tmp_path: Path, tiny_base: Path, monkeypatch) -> None:
    """A 2-layer Llama with a 65,536-token vocabulary and pairs of ~300 tokens: trl's ORPO keeps [8, ~300, 65,536]
    logits (bf16, their log-softmax, their gradient); qlora-kit's fused LM head none of them."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    folder = tmp_path / "wide-vocab"
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, vocab_size=65536, hidden_size=256,
                         intermediate_size=512, num_attention_heads=4, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    rng = random.Random(0)
    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as handle:
        for _ in range(8):
            words = rng.choices(WORDS, k=200 + rng.randrange(40))
            handle.write(json.dumps({"prompt": "please repeat the words " + " ".join(words) + " .",
                                     "chosen": " ".join(w.upper() for w in words[:40]),
                                     "rejected": " ".join(words[:40 + rng.randrange(20)])}) + "\n")
    plain = orpo_step_peak_gib(tmp_path, folder, pairs, trl_forward=True, monkeypatch=monkeypatch)
    monkeypatch.undo()
    fused = orpo_step_peak_gib(tmp_path, folder, pairs, trl_forward=False, monkeypatch=monkeypatch)
    bf16_logits = 8 * 280 * 65536 * 2 / 2**30  # about the least trl's path holds: one bf16 copy of the logits
    print(f"one ORPO step above the model: trl's full logits {plain:.3f} GiB, fused LM head {fused:.3f} GiB")
    assert fused < plain - bf16_logits


@pytest.mark.parametrize("shape", [(256, 4096), (1040, 2064)])  # the second: no whole tiles either way
@pytest.mark.parametrize("double_quant", [True, False])
def test_fp8_kernels_give_torch_s_float8_bits(shape: tuple[int, int], double_quant: bool) -> None:
    """The NF4 -> float8 kernel writes what torch's ops make of bitsandbytes' fp32 values (times the tensor's inverse
    scale, clamped, cast), in both layouts; the row cast scales each row to +-448 and rounds as torch does."""
    import bitsandbytes as bnb

    from qlora_kit.speed import fp8
    from qlora_kit.speed.nf4_triton import nf4_dequantize

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=double_quant, quant_type="nf4")
    layer.weight.data.normal_(0, 0.02)
    layer = layer.cuda()
    layer._triton_dequantize = True
    weight = fp8.fp8_weight(layer)
    dense = nf4_dequantize(layer.weight.data, layer.weight.quant_state,
                           out=torch.empty(shape, device="cuda", dtype=torch.float32))
    assert weight.scale.item() == pytest.approx(dense.abs().max().item() / fp8.FP8_MAX, rel=1e-6)
    expected = (dense * weight.inverse).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8).view(torch.uint8)
    assert torch.equal(fp8.nf4_to_fp8(layer, weight.inverse, transpose=False).view(torch.uint8), expected)
    assert torch.equal(fp8.nf4_to_fp8(layer, weight.inverse, transpose=True).view(torch.uint8),
                       expected.t().contiguous())

    rows = torch.randn(300, shape[1], device="cuda", dtype=torch.bfloat16)
    rows[7] = 0  # a zero row stays zero, no NaN from a zero scale
    rows[:, 5] *= 1000  # an outlier channel sets every row's scale
    cast, scale = fp8.rows_to_fp8(rows)
    largest = rows.float().abs().amax(1, keepdim=True)
    assert torch.allclose(scale, largest.clamp(min=1e-30) / fp8.FP8_MAX, rtol=1e-6, atol=0)
    torch_cast = (rows.float() / scale).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8).view(torch.uint8)
    assert (cast.view(torch.uint8) == torch_cast).float().mean() > 0.9999  # a last-bit tie may round apart
    assert torch.equal(cast[7].float(), torch.zeros(shape[1], device="cuda"))
    # e4m3 rounds to half a unit in the last place: 1/16 of a normal value, 2^-10 (scaled) below 2^-6
    bound = torch.maximum(rows.float().abs() / 16, scale * 2**-10) * (1 + 1e-5)
    assert ((cast.float() * scale - rows.float()).abs() <= bound).all()


@pytest.mark.parametrize("fused_mlp", [False, True])
def test_fp8_lora_layers_stay_within_float8_rounding_of_bf16(fused_mlp: bool) -> None:
    """One LoRA layer over an NF4 weight, forward and backward, with an outlier channel in its input: in float8
    the output and the input gradients stay within float8's rounding (a few percent) of the bf16 path's; the
    adapter's gradients, bf16 matmuls of the same dY and input, are the same bits."""
    import bitsandbytes as bnb

    from qlora_kit.speed.lora_autograd import GatedDownOver4bit, LoraOver4bit

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(2048, 4096, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight.data.normal_(0, 0.02)
    layer = layer.cuda()
    layer._triton_dequantize = True
    a = (torch.randn(16, 2048, device="cuda") * 0.02).requires_grad_()
    b = (torch.randn(4096, 16, device="cuda") * 0.02).requires_grad_()
    x = torch.randn(2, 512, 2048, device="cuda", dtype=torch.bfloat16)
    x[..., 3] *= 50
    up = torch.randn_like(x)
    grad_out = torch.randn(2, 512, 4096, device="cuda", dtype=torch.bfloat16)

    def run(fp8: bool) -> list[torch.Tensor]:
        layer._fp8_matmul = fp8
        inputs = [t.detach().clone().requires_grad_() for t in (x, up, a, b)]
        if fused_mlp:
            out = GatedDownOver4bit.apply(inputs[0], inputs[1], inputs[2], inputs[3], layer, 2.0, False)
        else:
            out = LoraOver4bit.apply(inputs[0], None, inputs[2], inputs[3], layer, 2.0, False)
        out.backward(grad_out)
        return [out.detach().float()] + [t.grad.float() for t in inputs if t.grad is not None]

    bf16, fp8 = run(False), run(True)
    names = ["out", "x", "up", "a", "b"] if fused_mlp else ["out", "x", "a", "b"]
    assert len(bf16) == len(fp8) == len(names)
    for name, got, want in zip(names, fp8, bf16, strict=True):
        if name in ("a", "b"):  # dY and the layer's input are the same; the frozen matmul does not enter
            assert torch.equal(got, want), name
            continue
        error = ((got - want).norm() / want.norm()).item()
        assert 0.005 < error < 0.06, (name, error)  # float8's rounding: there, and small


def test_fp8_training_follows_the_bf16_loss_curve(tmp_path: Path, tiny_base: Path, chat_file: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose every projection multiplies in float8 (the width floor lowered for the tiny model) trains to
    the bf16 run's losses within 2%; speed.fp8_matmul: false runs no float8 matmul."""
    import qlora_kit.speed.fp8
    import qlora_kit.speed.lora_autograd
    from qlora_kit.pipeline import run_training
    from qlora_kit.recipe import load_recipe

    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(qlora_kit.speed.fp8, "FP8_MIN_WIDTH", 16)
    calls: list[int] = []
    real = qlora_kit.speed.lora_autograd.fp8_linear
    monkeypatch.setattr(qlora_kit.speed.lora_autograd, "fp8_linear", lambda *a, **k: calls.append(1) or real(*a, **k))

    def losses(run_name: str, *overrides: str) -> list[float]:
        recipe = load_recipe(write_recipe(tmp_path, tiny_base, chat_file),
                             [f"training.run_name={run_name}", "export.merge=false", "training.learning_rate=0.01",
                              "lora.dropout=0", "speed.compile_layers=false", "training.max_steps=8",
                              "speed.cuda_graphs=false", *overrides])  # calls counted: no graph replays
        run_training(recipe)
        rows = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
        return [row["loss"] for row in rows if "loss" in row]

    bf16 = losses("bf16", "speed.fp8_matmul=false")
    assert not calls
    fp8 = losses("fp8", "speed.fp8_matmul=true")  # auto would leave 256-token micro-batches in bf16
    assert len(calls) >= 8 * 2 * 6  # steps x layers x the projections outside the fused MLP's down projection
    assert len(fp8) == 8 and bf16[-1] < bf16[0] - 0.1
    assert fp8 == pytest.approx(bf16, rel=0.02)


def test_float8_matmul_is_found_where_the_gpu_has_it() -> None:
    """The plan's one try of torch's rowwise float8 matmul says yes on Hopper (where auto takes float8) and on any
    GPU of compute capability 8.9+ whose torch build runs it; no below 8.9."""
    from qlora_kit.speed.fp8 import float8_matmul_works
    from qlora_kit.speed.plan import Machine

    capability = torch.cuda.get_device_capability()
    assert Machine.measure().float8 is float8_matmul_works()
    if capability[0] == 9:
        assert float8_matmul_works()
    elif capability < (8, 9):
        assert not float8_matmul_works()


def graphs_model(recipe, folder: Path, kept_layers: int):
    """wide_base trained the way the plan sets it up on a GPU: Liger, fused LoRA and MLP, fp32 adapter weights,
    checkpointing with the last `kept_layers` layers keeping their activations."""
    import sys

    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    from qlora_kit.model import build_quantized_model
    from qlora_kit.speed.patches import keep_activations, keep_adapter_weights_in_fp32, use_fused_lora, use_fused_mlp

    torch.manual_seed(0)
    model = build_quantized_model(recipe, str(folder), torch.bfloat16)
    keep_adapter_weights_in_fp32(model)
    nonzero_lora_b(model, 0.02)
    modeling = sys.modules[type(model.get_base_model()).__module__]
    module_before = dict(vars(modeling))
    _apply_liger_kernel_to_instance(model=model.get_base_model())
    for name, value in module_before.items():  # Liger's module-wide swaps undone for later tests (see above)
        setattr(modeling, name, value)
    use_fused_lora(model)
    use_fused_mlp(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    keep_activations(model, kept_layers)
    model.train()
    return model


def graph_training_run(model, batches: list[torch.Tensor], accumulate: int,
                       move_at: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Gradients after each optimizer step (SGD, lr 0.05, over `accumulate` micro-batches), as the trainer runs it:
    bf16 autocast, grads set to None after the step, the adapter casts forgotten. `move_at`: before that step every
    adapter weight gets new memory (`param.data = ...`), as a callback casting them would."""
    from qlora_kit.speed.lora_autograd import forget_compute_copies

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    steps = []
    for start in range(0, len(batches), accumulate):
        if move_at is not None and start == move_at * accumulate:
            for p in params.values():
                p.data = p.data.clone()
        for ids in batches[start:start + accumulate]:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # as trl calls it
            loss.backward()
        steps.append({n: p.grad.float().clone() for n, p in params.items()})
        with torch.no_grad():
            for p in params.values():
                p.add_(p.grad, alpha=-0.05)
                p.grad = None
        forget_compute_copies()
    return steps


@pytest.mark.parametrize("kept_layers", [2, 1, 0])  # every layer kept; one recomputes; both recompute
@pytest.mark.parametrize("accumulate", [1, 2])
def test_cuda_graph_layers_train_to_eager_gradients(kept_layers: int, accumulate: int, tmp_path: Path,
                                                    wide_base: Path, chat_file: Path) -> None:
    """The same micro-batches through the layers' own code and through their CUDA graphs (eager on a shape's first
    micro-batch, captured on its second, replayed after; the weights change every step) give the same gradients.
    A stale adapter cast inside a graph, gradients handed out in the graph's own buffers (accumulation doubling
    them) or an input not copied in would each show as a large difference. A batch of another shape runs eagerly
    and frees the graphs; the next repeat of a shape captures again."""
    from qlora_kit.recipe import load_recipe
    from qlora_kit.speed.cuda_graphs import use_cuda_graphs

    recipe = load_recipe(write_recipe(tmp_path, wide_base, chat_file))
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randint(4, 30, (2, 96), generator=generator).cuda() for _ in range(6 * accumulate)]
    batches += [torch.randint(4, 30, (3, 64), generator=generator).cuda() for _ in range(accumulate)]
    batches += [torch.randint(4, 30, (2, 96), generator=generator).cuda() for _ in range(3 * accumulate)]

    eager = graph_training_run(graphs_model(recipe, wide_base, kept_layers), batches, accumulate)
    model = graphs_model(recipe, wide_base, kept_layers)
    graphs = use_cuda_graphs(model)
    replays = []
    real_replay = torch.cuda.CUDAGraph.replay

    def counted_replay(graph):
        replays.append(1)
        return real_replay(graph)

    torch.cuda.CUDAGraph.replay = counted_replay
    try:
        graphed = graph_training_run(model, batches, accumulate)
    finally:
        torch.cuda.CUDAGraph.replay = real_replay
    # shape A, B, A again: each run's first micro-batch eager, its second captures (a lone B does not)
    assert graphs.broken is None and graphs.captures == (2 if accumulate == 1 else 3) and len(graphs.entries) == 2
    assert len(replays) == 2 * 2 * (len(batches) - 3)  # 2 layers x (forward + backward), from each capture on
    for step, (want, got) in enumerate(zip(eager, graphed, strict=True)):
        for name in want:
            error = ((got[name] - want[name]).norm() / want[name].norm()).item()
            assert error < 1e-2, (step, name, error)  # attention's backward is not bitwise; a bug is O(1)


def test_cuda_graphs_train_the_eager_loss_curve_through_the_pipeline(tmp_path: Path, tiny_base: Path,
                                                                     chat_file: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """speed.cuda_graphs on (auto: rows of one length) trains the losses of the run without graphs, and says it
    captured; the plan turns it off where rows differ in length."""
    from qlora_kit.pipeline import run_training
    from qlora_kit.recipe import load_recipe

    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path / "cache"))

    def losses(run_name: str, *overrides: str) -> tuple[list[float], list[str]]:
        recipe = load_recipe(write_recipe(tmp_path, tiny_base, chat_file),
                             [f"training.run_name={run_name}", "export.merge=false", "training.learning_rate=0.01",
                              "lora.dropout=0", "speed.compile_layers=false", "training.max_steps=8", *overrides])
        with qlora_kit_log() as messages:
            run_training(recipe)
        rows = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
        return [row["loss"] for row in rows if "loss" in row], messages

    eager, eager_log = losses("eager", "speed.cuda_graphs=false")
    graphed, graphed_log = losses("graphs")
    assert not any("capturing" in m for m in eager_log)
    assert sum("speed.cuda_graphs: capturing" in m for m in graphed_log) == 1, graphed_log
    assert len(graphed) == 8 and eager[-1] < eager[0] - 0.1
    assert graphed == pytest.approx(eager, rel=1e-3)


def test_cuda_graphs_capture_again_when_the_adapter_weights_get_new_memory(tmp_path: Path, wide_base: Path,
                                                                          chat_file: Path) -> None:
    """A graph reads the memory it was captured with: after `param.data = ...` it would train on the old weights
    forever. The layers notice, run their own code for that micro-batch and capture again: the gradients stay the
    eager run's."""
    from qlora_kit.recipe import load_recipe
    from qlora_kit.speed.cuda_graphs import use_cuda_graphs

    recipe = load_recipe(write_recipe(tmp_path, wide_base, chat_file))
    generator = torch.Generator().manual_seed(5)
    batches = [torch.randint(4, 30, (2, 96), generator=generator).cuda() for _ in range(8)]
    eager = graph_training_run(graphs_model(recipe, wide_base, 1), batches, 1, move_at=4)
    model = graphs_model(recipe, wide_base, 1)
    graphs = use_cuda_graphs(model)
    graphed = graph_training_run(model, batches, 1, move_at=4)
    assert graphs.broken is None and graphs.captures == 2  # step 2, and step 6 after step 5 ran its own code
    for step, (want, got) in enumerate(zip(eager, graphed, strict=True)):
        for name in want:
            assert ((got[name] - want[name]).norm() / want[name].norm()).item() < 1e-2, (step, name)


@pytest.mark.parametrize("shape", list(FAMILY_FUSED))
def test_every_family_trains_to_eager_gradients_through_cuda_graphs(shape: str, tmp_path: Path, tiny_base: Path,
                                                                    chat_file: Path) -> None:
    """Each family's own decoder layer (Gemma 3's returns a tuple; Gemma 2 runs eager attention; Phi-3 fuses its
    projections), one layer recomputed and one kept: captured and replayed, it trains to the eager gradients."""
    from qlora_kit.recipe import load_recipe
    from qlora_kit.speed.cuda_graphs import use_cuda_graphs

    folder, attn = save_family_model(shape, tmp_path, tiny_base)
    recipe = load_recipe(write_recipe(tmp_path, folder, chat_file), [attn])
    generator = torch.Generator().manual_seed(7)
    batches = [torch.randint(4, 30, (2, 96), generator=generator).cuda() for _ in range(5)]
    eager = graph_training_run(graphs_model(recipe, folder, 1), batches, 1)
    model = graphs_model(recipe, folder, 1)
    graphs = use_cuda_graphs(model)
    graphed = graph_training_run(model, batches, 1)
    assert graphs.broken is None and graphs.captures == 1 and len(graphs.entries) == 2
    for step, (want, got) in enumerate(zip(eager, graphed, strict=True)):
        for name in want:
            assert ((got[name] - want[name]).norm() / want[name].norm()).item() < 1e-2, (shape, step, name)


def test_rows_of_many_lengths_padded_to_max_length_train_through_graphs_to_the_unpadded_losses(
        tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """training.pad_to_max_length gives rows of many lengths one batch shape: the plan turns graphs on, they
    capture once, and the losses are the unpadded run's (right padding, causal attention: no trained token sees a
    pad; the padding is out of the loss)."""
    from qlora_kit.pipeline import run_training
    from qlora_kit.recipe import load_recipe

    monkeypatch.setenv("QLORA_KIT_CACHE", str(tmp_path / "cache"))
    rng = random.Random(1)
    data = tmp_path / "ragged.jsonl"
    with data.open("w") as handle:
        for _ in range(32):
            words = rng.sample(WORDS, rng.randint(1, 4))
            messages = [{"role": "user", "content": f"please repeat the words {' '.join(words)}."},
                        {"role": "assistant", "content": " ".join(w.upper() for w in words)}]
            handle.write(json.dumps({"messages": messages}) + "\n")

    def losses(run_name: str, *overrides: str) -> tuple[list[float], list[str]]:
        recipe = load_recipe(write_recipe(tmp_path, tiny_base, data),
                             [f"training.run_name={run_name}", "export.merge=false", "training.learning_rate=0.01",
                              "speed.compile_layers=false", "training.max_steps=8",
                              "speed.attention_kernel=default", *overrides])
        with qlora_kit_log() as messages:
            run_training(recipe)
        rows = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
        return [row["loss"] for row in rows if "loss" in row], messages

    ragged, ragged_log = losses("ragged")
    padded, padded_log = losses("padded", "training.pad_to_max_length=true")
    assert any("cuda_graphs: off, training batches come in many shapes" in m for m in ragged_log)
    assert sum("speed.cuda_graphs: capturing" in m for m in padded_log) == 1, padded_log
    assert len(padded) == 8 and ragged[-1] < ragged[0] - 0.1
    assert padded == pytest.approx(ragged, rel=5e-3)
