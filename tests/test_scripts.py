"""The GPU scripts keep working: their CPU paths run here (`bench.py --tiny`, the sparse checkpoint of multi_gpu.py)."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def test_sparse_checkpoint_loads_with_holes_for_decoder_linears(tmp_path):
    """`multi_gpu.py --fit` builds big shapes without the disk: decoder linears are holes that read as zeros."""
    from bench_common import build_sparse_model, build_tokenizer
    from transformers import AutoModelForCausalLM

    build_tokenizer(tmp_path / "tokenizer")
    info = build_sparse_model("tiny", tmp_path / "model", tmp_path / "tokenizer")
    shards = list((tmp_path / "model").glob("*.safetensors"))
    logical = sum(p.stat().st_size for p in shards)
    on_disk = sum(p.stat().st_blocks * 512 for p in shards)
    assert info["parameters"] * 2 == logical - sum(8 + int.from_bytes(p.read_bytes()[:8], "little") for p in shards)
    assert on_disk < logical  # the holes take no blocks

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.abs().sum() == 0 and layer.mlp.down_proj.weight.abs().sum() == 0
    assert layer.input_layernorm.weight.eq(1).all()
    assert 0.015 < model.model.embed_tokens.weight.float().std() < 0.025


# Each family recipe and the bench shape that measures it; gemma-3-4b's recipe trains the multimodal model's text
RECIPE_SHAPES = {"llama-3.1-8b": "8b", "mistral-7b": "mistral-7b", "qwen2.5-7b": "qwen2.5-7b", "qwen3-8b": "qwen3-8b",
                 "gemma-2-9b": "gemma-2-9b", "gemma-3-4b": "gemma-3-4b", "phi-4-mini": "phi-4-mini",
                 "smollm2-1.7b": "smollm2-1.7b"}


def test_every_family_recipe_has_a_bench_shape_of_its_own_config_class():
    """scripts/bench.py measures each family in recipes/ on a shape of that family's config class (test_family_recipes'
    FAMILIES names it), with the family's real widths, and a tiny shape of the same class for CPU runs."""
    from bench_common import SHAPES, TINY_FAMILIES, projection_shapes
    from test_family_recipes import FAMILIES

    recipes = {p.stem for p in (ROOT / "recipes").glob("*.yaml") if not p.stem.startswith("quickstart")}
    assert set(RECIPE_SHAPES) == recipes
    for recipe, shape in RECIPE_SHAPES.items():
        family_class = FAMILIES[f"{recipe}.yaml"][0]
        assert SHAPES[shape]["config"] == {"Gemma3Config": "Gemma3TextConfig"}.get(family_class, family_class)
    assert set(TINY_FAMILIES.values()) == set(RECIPE_SHAPES.values()) - {"8b"}
    assert all(SHAPES[tiny]["config"] == SHAPES[real]["config"] for tiny, real in TINY_FAMILIES.items())
    assert projection_shapes("qwen2.5-7b") == {"q_proj/o_proj": (3584, 3584), "k_proj/v_proj": (512, 3584),
                                               "gate_proj/up_proj": (18944, 3584), "down_proj": (3584, 18944)}
    assert projection_shapes("phi-4-mini") == {"qkv_proj": (5120, 3072), "o_proj": (3072, 3072),
                                               "gate_up_proj": (16384, 3072), "down_proj": (3072, 8192)}


@pytest.mark.parametrize("shape", ["tiny-qwen2.5", "tiny-qwen3", "tiny-mistral", "tiny-gemma-2", "tiny-gemma-3",
                                   "tiny-phi-4-mini", "tiny-smollm2"])
def test_sparse_checkpoint_of_every_family_loads_with_every_weight_in_place(tmp_path, shape):
    """The sparse checkpoint (multi_gpu.py --fit, the 70B bench shape) writes each family's own tensor names: Qwen2.5's
    q/k/v biases, Qwen3's q/k norms, Gemma's extra norms (zero: (1 + w) is the identity), Phi-3's fused projections,
    tied embeddings written once. transformers loads it with nothing missing and nothing unexpected."""
    import torch
    import transformers
    from bench_common import SHAPES, build_sparse_model, build_tokenizer
    from transformers import AutoModelForCausalLM

    build_tokenizer(tmp_path / "tokenizer")
    build_sparse_model(shape, tmp_path / "model", tmp_path / "tokenizer")
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "model", output_loading_info=True)
    assert type(model.config) is getattr(transformers, SHAPES[shape]["config"])
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    norm = model.model.layers[0].input_layernorm.weight
    assert norm.eq(0 if model.config.model_type.startswith("gemma") else 1).all()
    assert model.config.tie_word_embeddings is SHAPES[shape]["tie_word_embeddings"]
    ids = torch.randint(5, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    assert abs(model(ids, labels=ids).loss.item() - math.log(model.config.vocab_size)) < 0.5  # random, not broken


@pytest.mark.slow
def test_bench_dry_run_trains_families_with_their_own_layouts_on_both_paths(tmp_path):
    """`bench.py --tiny --configs tiny-FAMILY:1,...` runs qlora-kit's CLI and the hand-glued reference on a tiny model
    of a family's own config class, and both start from the same loss. The families whose bench path differs from
    Llama's (Qwen2.5's biases, Gemma 2's eager attention and softcapping, Phi-3's fused projections); every family's
    checkpoint and gradients are tested in tests/test_speed.py and above, in a fraction of the 14 processes' time."""
    families = ["tiny-qwen2.5", "tiny-gemma-2", "tiny-phi-4-mini"]
    out = tmp_path / "out"
    configs = ",".join(f"{shape}:1" for shape in families)
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--tiny", "--configs", configs, "--seq", "96",
         "--out", str(out), "--work", str(tmp_path / "w")],
        cwd=ROOT, capture_output=True, text=True, timeout=1200, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    runs = json.loads((out / "bench.json").read_text())["runs"]
    paths = ("qlora-kit", "reference")
    assert [(r["shape"], r["path"]) for r in runs] == [(shape, path) for shape in families for path in paths]
    assert all(r["error"] is None and r["measured_steps"] == 2 for r in runs), [r.get("error") for r in runs]
    for shape in families:
        ours, reference = (r["losses"][0] for r in runs if r["shape"] == shape)
        assert abs(ours - reference) < 1e-3, (shape, ours, reference)


@pytest.mark.slow
def test_bench_dry_run_compares_variants_with_the_reference(tmp_path):
    """`bench.py --tiny` runs the real CLI per variant and the hand-glued reference, and both compute the same loss."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--tiny", "--out", str(out), "--work", str(tmp_path / "w"),
         "--variant", "defaults", "--variant", "bf16:quantization.upcast_to_fp32=false", "--warm-up"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((out / "bench.json").read_text())
    runs = results["runs"]
    assert [r["path"] for r in runs] == ["qlora-kit:defaults", "qlora-kit:bf16", "reference"]
    (warm,) = results["warm_ups"]  # --warm-up: one untimed run of the shape first, not among the compared runs
    assert warm["shape"] == "tiny" and warm["error"] is None and warm["wall_s"] > 0
    assert runs[0]["overrides"] == ["training.optimizer=auto", "speed.keep_activations_layers=auto"]
    assert all(r["error"] is None and r["tokens_per_second"] > 0 and r["measured_steps"] == 2 for r in runs)
    assert all(len(r["step_seconds"]) == 2 and min(r["step_seconds"]) > 0 for r in runs)  # each measured step
    first_losses = {r["path"]: r["losses"][0] for r in runs}
    assert max(first_losses.values()) - min(first_losses.values()) < 1e-3, first_losses  # same model, data, init
    assert "| qlora-kit:bf16 |" in (out / "bench.md").read_text()


def test_bench_variant_defaults_is_qlora_kits_own_defaults_and_nothing_else():
    """The bench recipe pins the optimizer and checkpointing to the plain path's; `--variant defaults` undoes that
    with the recipe dataclasses' defaults. A variant named `defaults` with other overrides (`defaults:` means none)
    is refused, not run mislabelled."""
    import bench

    from qlora_kit.recipe import SpeedSection, TrainingSection

    variants = bench.parse_variants(["defaults", "kept9:speed.keep_activations_layers=9", "base:"])
    assert variants == {
        "qlora-kit:defaults": [f"training.optimizer={TrainingSection.optimizer}",
                               f"speed.keep_activations_layers={SpeedSection.keep_activations_layers}"],
        "qlora-kit:kept9": ["speed.keep_activations_layers=9"], "qlora-kit:base": []}
    spelled_out = "defaults:" + ",".join(variants["qlora-kit:defaults"])
    assert bench.parse_variants([spelled_out]) == {"qlora-kit:defaults": variants["qlora-kit:defaults"]}
    with pytest.raises(SystemExit, match="is not qlora-kit's defaults"):
        bench.parse_variants(["defaults:"])


def test_long_context_probe_model_has_rope_scaling_that_qlora_kit_accepts(tmp_path, make_recipe):
    """Rows longer than the shape's positions get a Llama-3.1-style RoPE-scaled checkpoint, which passes
    qlora-kit's max_length check instead of being refused."""
    from bench_common import build_tokenizer, cmd_build_model
    from transformers import AutoConfig

    from qlora_kit.model import check_model_config
    from qlora_kit.recipe import load_recipe

    build_tokenizer(tmp_path / "tokenizer")
    cmd_build_model("tiny", str(tmp_path / "model"), str(tmp_path / "tokenizer"), "5000")
    config = AutoConfig.from_pretrained(tmp_path / "model")
    assert config.max_position_embeddings == 3 * 2048 >= 5000
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["factor"] == 3.0
    check_model_config(load_recipe(make_recipe(training={"max_length": 5000})), str(tmp_path / "model"))


@pytest.mark.slow
def test_long_context_memory_probe_runs_one_step_with_the_memory_savers(tmp_path):
    """The long-context command of bench.py's docstring, shrunk to the tiny shape: a RoPE-scaled model, one step
    (memory only, no tokens/s), offloaded checkpoints and a chunked MLP, under the --gpu-memory-gib wrapper."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--tiny", "--configs", "tiny:1", "--seq", "2600",
         "--steps", "1", "--paths", "qlora-kit", "--gpu-memory-gib", "79", "--override",
         "speed.offload_checkpoints=true", "--override", "speed.mlp_chunk_tokens=512", "--out", str(out),
         "--work", str(tmp_path / "w")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (run,) = json.loads((out / "bench.json").read_text())["runs"]
    assert run["error"] is None and len(run["losses"]) == 1 and run["tokens_per_second"] is None
    assert "speed.offload_checkpoints: 2 checkpointed layers" in done.stdout + done.stderr
    assert "speed.mlp_chunk_tokens: 2 MLPs run over chunks of 512 tokens" in done.stdout + done.stderr


def test_gpu_idle_report_blames_the_host_op_open_when_the_gpu_ran_dry():
    from types import SimpleNamespace

    from bench import gpu_idle_report

    def event(name, start, end, device):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device)

    kernels = [event("gemm", 0, 100, "cuda"), event("gemm", 150, 300, "cuda"), event("copy", 290, 310, "cuda"),
               event("gemm", 1310, 1400, "cuda")]
    host = [event("step", 0, 2000, "cpu"), event("aten::item", 95, 160, "cpu"),  # a sync: 50 us idle
            event("Optimizer.step", 305, 1320, "cpu"), event("aten::empty", 309, 315, "cpu")]  # 1000 us idle

    report = gpu_idle_report(host + kernels, kernels)

    assert "1.1 ms in 2 gaps" in report
    lines = report.splitlines()[2:]
    assert "1.0 ms" in lines[0] and lines[0].endswith("aten::empty")  # innermost op open at the gap's start
    assert "0.1 ms" in lines[1] and lines[1].endswith("aten::item")


SHARED = {"bench_common", "quickstart_people"}  # the scripts' shared helpers


def test_scripts_import_only_the_shared_helper_modules_which_import_no_script():
    """No import circles among the scripts: each imports at most the shared helper modules (bench_common for the
    benchmarks, quickstart_people for the quickstart data), and those import none of them."""
    scripts = {path.stem: path for path in (ROOT / "scripts").glob("*.py")}
    imported = {}
    for name, path in scripts.items():
        modules = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules.add(node.module)
        imported[name] = modules & set(scripts)
    assert {name: imported.pop(name) for name in SHARED} == {name: set() for name in SHARED}
    assert {name: found for name, found in imported.items() if found - SHARED} == {}
    assert "bench_common" in imported["bench"] and "bench_common" in imported["multi_gpu"]
    assert all("quickstart_people" in imported[name]
               for name in ("make_quickstart_data", "make_preference_data", "make_grpo_data"))


def test_projection_shapes_are_the_llama_3_8b_weights():
    from bench_common import projection_shapes

    assert projection_shapes("8b") == {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (1024, 4096),
                                       "gate_proj/up_proj": (14336, 4096), "down_proj": (4096, 14336)}


def test_unsloth_child_gets_its_own_site_first_offline_and_the_other_paths_settings(tmp_path):
    """`--paths unsloth`: the child's PYTHONPATH starts with --unsloth-site (its trl 1.15 shadows the main set's), it
    runs offline without unsloth's statistics download, compiles into --work, and trains what the other paths train:
    same LoRA on all seven projections, batch, steps, schedule, seed and data, with unsloth's own memory settings."""
    import bench
    from bench_common import LEARNING_RATE, LORA, SCHEDULER, SEED, WARMUP, qlora_kit_recipe

    site, work = tmp_path / "site", tmp_path / "work"
    env = bench.unsloth_environment(site, work, {"PYTHONPATH": "/tmp/site:/repo", "HOME": "/home/x"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(site.resolve()), "/tmp/site", "/repo"]
    assert env["HF_HUB_OFFLINE"] == "1" and "UNSLOTH_DISABLE_STATISTICS" in env and env["HOME"] == "/home/x"
    assert env["UNSLOTH_COMPILE_LOCATION"] == str((work / "unsloth_compiled_cache").resolve())
    assert bench.unsloth_environment(site, work, {})["PYTHONPATH"] == str(site.resolve())

    base = {"shape": "8b", "seq": 2048, "batch": 2, "steps": 12}
    spec = bench.unsloth_spec(base, tmp_path / "model", tmp_path / "data.jsonl", work)
    recipe = qlora_kit_recipe(tmp_path / "model", tmp_path / "data.jsonl", work, "8b", 2048, 2, 12, gpu=True)
    assert spec["lora"] == {"r": LORA["r"], "lora_alpha": LORA["alpha"], "lora_dropout": LORA["dropout"],
                            "bias": "none", "random_state": SEED, "use_gradient_checkpointing": "unsloth",
                            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]}
    t = recipe["training"]
    assert spec["sft"] == {"per_device_train_batch_size": t["batch_size"], "max_steps": t["max_steps"],
                           "learning_rate": LEARNING_RATE, "lr_scheduler_type": SCHEDULER, "warmup_steps": WARMUP,
                           "seed": SEED, "optim": "adamw_8bit", "bf16": True, "max_length": t["max_length"],
                           "logging_steps": 1, "report_to": "none"}
    assert (t["learning_rate"], t["lr_scheduler"], t["warmup"], t["seed"]) == (LEARNING_RATE, SCHEDULER, WARMUP, SEED)
    assert spec["data"] == str((tmp_path / "data.jsonl").resolve()) == str(Path(recipe["data"]["datasets"][0]["path"]))
    assert spec["work"] == str(work.resolve())

    spec_path = tmp_path / "spec.json"
    assert bench.unsloth_command(spec_path) == [sys.executable, bench.__file__, "unsloth", str(spec_path)]
    bench.GPU_MEMORY_CAP_GIB = 79.0
    try:  # --gpu-memory-gib caps the unsloth child as it caps the others
        assert bench.unsloth_command(spec_path) == [sys.executable, bench.__file__, "capped", "79.0", bench.__file__,
                                                    "unsloth", str(spec_path)]
    finally:
        bench.GPU_MEMORY_CAP_GIB = None


def test_bench_without_an_unsloth_site_stops_with_one_line_saying_how_to_install_it(tmp_path):
    import bench

    with pytest.raises(SystemExit) as stopped:
        bench.main(["--tiny", "--paths", "qlora-kit,unsloth", "--unsloth-site", str(tmp_path / "nowhere"),
                    "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w")])
    message = str(stopped.value)
    assert "\n" not in message and f"no unsloth in {tmp_path / 'nowhere'}" in message
    assert "fetch_unsloth_wheels.sh" in message and "device_prelude_unsloth.sh" in message
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_unsloth_child_imports_unsloth_from_its_site_before_transformers_trl_and_peft(tmp_path):
    """The real child command line, with a stand-in unsloth in the site that records what was imported before it
    and where it was found, then stops: the failure is recorded like any path's, the run goes on."""
    import bench

    site = tmp_path / "site"
    (site / "unsloth_zoo").mkdir(parents=True)
    (site / "unsloth_zoo" / "__init__.py").write_text("")
    (site / "unsloth").mkdir()
    (site / "unsloth" / "__init__.py").write_text(
        "import json, os, sys\n"
        "seen = sorted(m for m in ('transformers', 'trl', 'peft') if m in sys.modules)\n"
        "json.dump({'before': seen, 'file': __file__, 'cwd': os.getcwd(),\n"
        "           'offline': os.environ.get('HF_HUB_OFFLINE')}, open(os.environ['PROBE_OUT'], 'w'))\n"
        "raise SystemExit('stand-in unsloth stops here')\n")
    assert bench.unsloth_site_problem(site) is None
    work = tmp_path / "work"
    work.mkdir()
    probe = tmp_path / "probe.json"
    os.environ["PROBE_OUT"] = str(probe)
    try:
        record = bench.run_unsloth({"shape": "tiny", "seq": 128, "batch": 2, "steps": 4}, tmp_path / "model",
                                   tmp_path / "data.jsonl", work, site, timeout=120)
    finally:
        del os.environ["PROBE_OUT"]
    seen = json.loads(probe.read_text())
    assert seen["before"] == [] and seen["file"] == str(site.resolve() / "unsloth" / "__init__.py")
    assert seen["cwd"] == str(work.resolve()) and seen["offline"] == "1"
    assert record["path"] == "unsloth" and record["error"].startswith("exit 1")
    assert "stand-in unsloth stops here" in "\n".join(record["log_tail"])


def test_a_bench_variant_with_a_memory_goal_is_not_pinned_to_every_layer_checkpointed(make_recipe):
    """The bench pins keep_activations_layers to 0 (the plain path's setting); speed.memory chooses the kept layers
    and qlora-kit refuses both set, so such a variant gets `auto` (an H200 call lost its runs to that), and the
    optimizer qlora-kit picks (`auto`), as a recipe with speed.memory has."""
    import bench
    from bench_common import qlora_kit_recipe

    from qlora_kit.recipe import RecipeError, load_recipe

    assert qlora_kit_recipe(Path("m"), Path("d"), Path("w"), "tiny", 64, 2, 3, False)["speed"] == \
        {"keep_activations_layers": 0}
    pinned = make_recipe(speed={"keep_activations_layers": 0})
    overrides = bench.unpinned(["speed.memory=12.5"])
    assert overrides == ["speed.memory=12.5", "training.optimizer=auto", "speed.keep_activations_layers=auto"]
    with pytest.raises(RecipeError, match="contradicts speed.memory"):
        load_recipe(pinned, ["speed.memory=12.5"])
    assert load_recipe(pinned, overrides).speed.memory == 12.5
    assert bench.unpinned(["speed.memory=12", "speed.keep_activations_layers=auto", "training.optimizer=adamw_torch"]) \
        == ["speed.memory=12", "speed.keep_activations_layers=auto", "training.optimizer=adamw_torch"]
    assert load_recipe(pinned, overrides).training.optimizer == "auto"  # what a recipe with speed.memory gets
    assert bench.unpinned(["training.optimizer=auto"]) == ["training.optimizer=auto"]


def test_a_bench_variant_matched_to_the_reference_takes_its_measured_peak_as_the_memory_target():
    """`speed.memory=reference`: the target is the plain path's measured peak (floored, never above it); without a
    finished reference run the variant is refused rather than run at some other target."""
    import bench

    assert bench.matched_to_reference(["speed.memory=reference", "training.optimizer=auto"], 11.12775) == \
        ["speed.memory=11.12", "training.optimizer=auto"]
    assert bench.matched_to_reference(["speed.memory=12"], None) == ["speed.memory=12"]
    with pytest.raises(RuntimeError, match="reference run of this shape"):
        bench.matched_to_reference(["speed.memory=reference"], None)


def test_every_family_s_tokenizer_class_renders_the_bench_rows_to_their_exact_length(tmp_path):
    """The bench rows are exactly `seq` tokens under the tokenizer each path loads from a model folder, whatever
    class transformers picks for the family (Qwen2 folders load as Qwen2Tokenizer, which rebuilt a word-level
    vocabulary into fewer, garbled tokens); the guard refuses a folder whose tokenizer renders a row differently."""
    from bench_common import SHAPES, build_tokenizer, chat_data, check_model_tokenizer, shape_config
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    data = Path(chat_data(tmp_path, 256, 4)["path"])
    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    for shape in ("tiny", *(s for s in SHAPES if s.startswith("tiny-"))):
        folder = tmp_path / shape
        shape_config(shape, tokenizer)[0].save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        check_model_tokenizer(folder, data)

    words = sorted({w.strip(".?!,") for line in data.read_text().splitlines() for m in json.loads(line)["messages"]
                    for w in m["content"].split()} | {"user", "assistant", ".", "?", "!"})
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    word_level.chat_template = tokenizer.chat_template
    folder = tmp_path / "word-level-qwen2"
    shape_config("tiny-qwen2.5", tokenizer)[0].save_pretrained(folder)
    word_level.save_pretrained(folder)
    with pytest.raises(RuntimeError, match="renders the bench row to"):
        check_model_tokenizer(folder, data)
