"""speed.shared_prefix: DPO / ORPO / SimPO run each pair's common prefix once, with the loss and every LoRA gradient
of the unshared path (tiny models of several families, sliding windows shorter than the rows, checkpointed layers,
fused LoRA), the unchanged forward wherever a batch is not right-padded pairs, and the plan's choice."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from conftest import WORDS, save_family_model, write_jsonl
from test_methods import loss_and_adapter_gradients, method_sections

from qlora_kit.recipe import RecipeError, load_recipe
from qlora_kit.speed.shared_prefix import (
    FLEX_BLOCK,
    pack_pairs,
    pairs_share_prefix,
    share_pair_prefixes,
    use_flex_attention_for_pairs,
)

PAIR_METHODS = ("dpo", "orpo", "simpo")
BATCH = 4  # pairs per batch: 2 x 4 rows unshared, 4 packed rows shared

# name: (bench tiny shape, config overrides, attention). Windows of 6 tokens are far shorter than the ~30-token rows.
FAMILIES = {"llama": ("tiny", {}, "sdpa"), "qwen2": ("tiny-qwen2.5", {}, "sdpa"),
            "gemma2": ("tiny-gemma-2", {"sliding_window": 6}, "eager"),
            "mistral": ("tiny-mistral", {"sliding_window": 6}, "sdpa")}


def prefix_pairs() -> list[dict]:
    """Prompts of 2 to 4 words (rows of different lengths, so padding); chosen and rejected share their first two
    words past the prompt, then differ (and differ in length)."""
    rows = []
    for i in range(8):
        words = WORDS[i:i + 2 + i % 3]
        shared = " ".join(word.upper() for word in words[:2])
        rows.append({"prompt": "Shout the words " + " ".join(words) + ".",
                     "chosen": " ".join([shared, *(word.upper() for word in words[2:]), "DONE"]),
                     "rejected": " ".join([shared, *words[2:], "no"])})
    return rows


@pytest.fixture(scope="session")
def prefix_pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("prefix-pairs") / "pairs.jsonl", prefix_pairs())


@pytest.fixture(scope="session")
def long_prefix_pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prefix_pairs() with prompts of 70 or more words: rows long enough that packed rows of whole 128-token flex
    blocks still save tokens."""
    rows = [{**row, "prompt": row["prompt"] + " Then " + " ".join(WORDS[i % 10:] + WORDS * 7)}
            for i, row in enumerate(prefix_pairs())]
    return write_jsonl(tmp_path_factory.mktemp("long-prefix-pairs") / "pairs.jsonl", rows)


@pytest.fixture(scope="session")
def family_folder(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """`family_folder(name)`: a random model of FAMILIES[name] over the tiny ChatML tokenizer, built once."""
    built: dict[str, Path] = {}

    def build(name: str) -> Path:
        if name not in built:
            shape, overrides, _ = FAMILIES[name]
            built[name] = save_family_model(shape, tmp_path_factory.mktemp(f"pairs-{name}"), tiny_model_dir,
                                            **overrides)
        return built[name]

    return build


def assert_same_loss_and_gradients(loss, grads: dict, plain_loss, plain_grads: dict) -> None:
    """fp32 on CPU: the loss and every LoRA gradient (each non-zero) equal the plain path's."""
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in grads.items():
        assert grad.norm() > 0, name
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def pair_trainer(method: str, family: str, share: bool, checkpointing: str, folder: Path, make_recipe, pairs: Path,
                 tokenizer, run_dir: Path, **training):
    """qlora-kit's trainer for `method` on the family's tiny NF4 model (fused LoRA on), with the speed plan applied
    as when training starts, and random LoRA B weights (the policy differs from its reference)."""
    from qlora_kit.data import build_datasets
    from qlora_kit.model import build_quantized_model
    from qlora_kit.speed import Machine, decide_speed_plan
    from qlora_kit.trainers import build_trainer

    speed: dict = {"shared_prefix": share}
    if checkpointing == "reentrant":
        speed["reentrant_checkpointing"] = True
    if checkpointing == "non-reentrant":
        speed["keep_activations_layers"] = 1  # the last layer keeps its activations, the first recomputes
    sections = method_sections(method, pairs, gradient_checkpointing=checkpointing != "none", batch_size=BATCH,
                               **training)
    recipe = load_recipe(make_recipe(f"{method}-{family}-{share}", **sections, speed=speed,
                                     model={"name": str(folder), "attn_implementation": FAMILIES[family][2]}))
    torch.manual_seed(0)
    model = build_quantized_model(recipe, str(folder), torch.float32)
    plan = decide_speed_plan(recipe, model.config, Machine.measure(), model.get_nb_trainable_parameters()[0])
    assert plan.shared_prefix is share
    trainer = build_trainer(recipe, model, tokenizer, build_datasets(recipe, tokenizer), run_dir, torch.float32, plan)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in sorted(trainer.model.named_parameters()):
            if "lora_B.default" in name:
                param.normal_(0, 0.05)
    if checkpointing != "none":
        trainer.model.gradient_checkpointing_enable(trainer.args.gradient_checkpointing_kwargs)
    trainer.callback_handler.on_train_begin(trainer.args, trainer.state, trainer.control)
    assert hasattr(trainer.model.get_decoder().layers[0].self_attn.q_proj, "_peft_forward")  # fused LoRA
    return trainer


def loss_gradients_and_decoder_rows(trainer) -> tuple[torch.Tensor, dict, list[tuple[int, int]]]:
    """The loss and adapter gradients of the first batch, and the (rows, length) of every decoder forward."""
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)]))
    shapes: list[tuple[int, int]] = []
    hook = trainer.model.get_decoder().layers[0].register_forward_pre_hook(
        lambda module, args: shapes.append(tuple(args[0].shape[:2])))
    try:
        loss, grads = loss_and_adapter_gradients(trainer, batch)
    finally:
        hook.remove()
    return loss, grads, shapes


def compare_shared_with_unshared(method: str, family: str, checkpointing: str, family_folder, make_recipe,
                                 prefix_pairs_file, tiny_tokenizer, tmp_path) -> None:
    folder = family_folder(family)
    results = {share: loss_gradients_and_decoder_rows(pair_trainer(
        method, family, share, checkpointing, folder, make_recipe, prefix_pairs_file, tiny_tokenizer,
        tmp_path / str(share))) for share in (False, True)}
    (plain_loss, plain_grads, plain_shapes), (loss, grads, shapes) = results[False], results[True]

    forwards = 2 if method == "dpo" else 1  # DPO's policy and reference passes
    assert len(plain_shapes) == len(shapes) == forwards
    for (rows, length), (packed_rows, packed_length) in zip(plain_shapes, shapes, strict=True):
        assert rows == 2 * BATCH and packed_rows == BATCH  # the packed forward really ran
        assert packed_rows * packed_length < rows * length
    assert_same_loss_and_gradients(loss, grads, plain_loss, plain_grads)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", PAIR_METHODS)
def test_shared_prefix_gives_the_unshared_loss_and_every_lora_gradient(method, family, family_folder, make_recipe,
                                                                       prefix_pairs_file, tiny_tokenizer, tmp_path):
    """Checkpointed and kept layers, fused LoRA; Gemma 2 (eager, softcapping, every other layer sliding) and Mistral
    (every layer sliding) with windows shorter than the rows."""
    compare_shared_with_unshared(method, family, "non-reentrant", family_folder, make_recipe, prefix_pairs_file,
                                 tiny_tokenizer, tmp_path)


@pytest.mark.parametrize(("method", "family", "checkpointing"), [
    ("dpo", "llama", "reentrant"), ("dpo", "gemma2", "reentrant"), ("simpo", "mistral", "reentrant"),
    ("dpo", "llama", "none"), ("orpo", "qwen2", "none")])
def test_shared_prefix_trains_the_same_with_reentrant_or_no_checkpointing(method, family, checkpointing,
                                                                          family_folder, make_recipe,
                                                                          prefix_pairs_file, tiny_tokenizer,
                                                                          tmp_path):
    """The mask and positions are plain inputs of each layer: a reentrant recompute sees the same ones."""
    compare_shared_with_unshared(method, family, checkpointing, family_folder, make_recipe, prefix_pairs_file,
                                 tiny_tokenizer, tmp_path)


# ------------------------------------------------------------------------------------------------ fallbacks


def right_padded_pairs(pairs: int = 2, length: int = 24, shared: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """[chosen rows; rejected rows]: each pair shares its first `shared` tokens; lengths differ, right padding."""
    ids = torch.randint(3, 300, (2 * pairs, length), generator=torch.Generator().manual_seed(0))
    ids[pairs:, :shared] = ids[:pairs, :shared]
    mask = torch.zeros_like(ids)
    for row in range(2 * pairs):
        mask[row, :length - 2 * (row % 3)] = 1
    return ids, mask


def decoder_rows_and_logits(model, ids, mask, shared: bool, **kwargs) -> tuple[list[int], torch.Tensor]:
    """The rows of each decoder forward, and the logits, of one no-grad call (inside pairs_share_prefix() if
    `shared`)."""
    rows: list[int] = []
    hook = model.get_decoder().layers[0].register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        with torch.no_grad(), pairs_share_prefix() if shared else contextlib.nullcontext():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits
    finally:
        hook.remove()
    return rows, logits


@pytest.fixture
def shared_llama(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert share_pair_prefixes(model) and not share_pair_prefixes(model)  # rebound once
    return model


def test_right_padded_pairs_are_packed_and_score_the_same_tokens(shared_llama):
    ids, mask = right_padded_pairs()
    rows, expected = decoder_rows_and_logits(shared_llama, ids, mask, shared=False)
    assert rows == [4]  # outside pairs_share_prefix() the decoder runs unchanged
    rows, logits = decoder_rows_and_logits(shared_llama, ids, mask, shared=True)
    assert rows == [2]
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], expected[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["left padding", "odd batch", "no common prefix", "position_ids"])
def test_a_batch_that_is_not_right_padded_pairs_runs_the_unchanged_forward(case, shared_llama):
    ids, mask = right_padded_pairs()
    kwargs = {}
    if case == "left padding":
        ids, mask = ids.flip(1), mask.flip(1)
    elif case == "odd batch":
        ids, mask = ids[:3], mask[:3]
    elif case == "no common prefix":
        ids[2:, 0] = ids[:2, 0] + 1
    else:
        kwargs["position_ids"] = torch.arange(ids.shape[1])[None].expand_as(ids)
    _, expected = decoder_rows_and_logits(shared_llama, ids, mask, shared=False, **kwargs)
    rows, logits = decoder_rows_and_logits(shared_llama, ids, mask, shared=True, **kwargs)
    assert rows == [ids.shape[0]]
    assert torch.equal(logits, expected)


def test_packing_shares_the_longest_common_prefix_and_puts_every_token_back():
    ids, mask = right_padded_pairs(pairs=2, length=24, shared=10)
    ids[2, 10] = ids[0, 10]  # the first pair shares one token more
    packing = pack_pairs(ids, mask, multiple=8)
    lengths = mask.sum(1)
    shared = [11, 10]
    for pair in range(2):
        s, c, r = shared[pair], lengths[pair] - shared[pair], lengths[pair + 2] - shared[pair]
        segments = packing.segments[pair]
        assert segments[:s].eq(0).all() and segments[s:s + c].eq(1).all() and segments[s + c:s + c + r].eq(2).all()
        assert segments[s + c + r:].eq(3).all()
        positions = packing.position_ids[pair]
        assert positions[:s + c].tolist() == list(range(s + c))
        assert positions[s + c:s + c + r].tolist() == list(range(s, s + r))
    # every real token of every row comes back from the packed row at its place
    back = packing.input_ids.reshape(-1)[packing.source]
    assert torch.equal(back[packing.valid], ids[mask.bool()])
    assert packing.input_ids.shape[1] % 8 == 0


# ------------------------------------------------------------------------------------------------ flex attention


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_flex_attention_block_mask_path_computes_the_dense_path_forward_on_cpu(tiny_model_dir):
    """The GPU path's BlockMask and attention function, forward only (flex attention has no CPU backward): the
    packed rows (a whole number of 128-token blocks) give the unshared hidden states; ordinary calls take sdpa."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    ids, mask = right_padded_pairs(pairs=2, length=100, shared=70)
    _, expected = decoder_rows_and_logits(model, ids, mask, shared=False)
    share_pair_prefixes(model)
    use_flex_attention_for_pairs(model)
    shapes: list[tuple[int, int]] = []
    hook = model.get_decoder().layers[0].register_forward_pre_hook(
        lambda module, args: shapes.append(tuple(args[0].shape[:2])))
    _, ordinary = decoder_rows_and_logits(model, ids, mask, shared=False)
    _, logits = decoder_rows_and_logits(model, ids, mask, shared=True)
    hook.remove()
    assert shapes == [(4, 100), (2, FLEX_BLOCK)]
    torch.testing.assert_close(ordinary, expected, rtol=1e-5, atol=1e-5)
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], expected[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("method", PAIR_METHODS)
def test_flex_attention_gives_the_dense_and_the_unshared_loss_and_gradients_on_gpu(method, family_folder, make_recipe,
                                                                                   long_prefix_pairs_file,
                                                                                   tiny_tokenizer, tmp_path,
                                                                                   monkeypatch):
    """On a GPU with sdpa the plan shares prefixes through flex attention (compiled once, dynamic shapes): the same
    loss and LoRA gradients as the dense-mask path and as the unshared path (tests/test_methods.py's GPU test
    compares it with trl's plain trainer as well)."""
    import qlora_kit.speed.plan as plan_module
    from qlora_kit.speed.shared_prefix import FLEX_ATTENTION

    folder = family_folder("llama")

    def run(share: bool, name: str):
        trainer = pair_trainer(method, "llama", share, "non-reentrant", folder, make_recipe, long_prefix_pairs_file,
                               tiny_tokenizer, tmp_path / name, max_length=320)
        return trainer, loss_gradients_and_decoder_rows(trainer)

    flex_trainer, flex = run(True, "flex")
    assert flex_trainer.model.config._attn_implementation == FLEX_ATTENTION
    monkeypatch.setattr(plan_module, "use_flex_attention_for_pairs", lambda model: None)  # sdpa, dense pair masks
    dense_trainer, dense = run(True, "dense")
    assert dense_trainer.model.config._attn_implementation == "sdpa"
    _, unshared = run(False, "unshared")
    assert [rows for rows, _ in flex[2]] == [rows for rows, _ in dense[2]] == [BATCH] * len(unshared[2])
    assert all(length % FLEX_BLOCK == 0 for _, length in flex[2])
    for loss, grads, _ in (dense, unshared):
        torch.testing.assert_close(flex[0], loss, rtol=1e-5, atol=1e-6)
        assert flex[1].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(flex[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------ plan


def plan_for(make_recipe, pairs_file, tiny_model_dir, method: str, attention: str = "sdpa", gpus: int = 1,
             processes: int = 1, **speed):
    from transformers import AutoConfig

    from qlora_kit.speed import Machine, decide_speed_plan

    sections = method_sections(method, pairs_file)
    if method == "sft":
        sections["data"] = {"cache": False}
    recipe = load_recipe(make_recipe(**sections, speed=speed, model={"attn_implementation": attention}))
    machine = Machine(gpus=gpus, usable_gpu_gib=78.0 if gpus else 0.0, capability=(9, 0) if gpus else None,
                      processes=processes, under_fsdp=False, triton=False, liger=False)
    return decide_speed_plan(recipe, AutoConfig.from_pretrained(tiny_model_dir), machine, 0)


@pytest.mark.parametrize("method", PAIR_METHODS)
def test_true_shares_prefixes_for_pair_methods_with_sdpa_or_eager_and_auto_where_flex_attention_runs(
        method, make_recipe, prefix_pairs_file, tiny_model_dir):
    """`true`: flex attention on a GPU with sdpa, a dense mask with eager or on CPU. `auto`: on where the flex path runs
    (measured 1.25x on DPO's step on an H200), off with a note on CPU and with eager (a dense mask, not measured)."""
    gpu = plan_for(make_recipe, prefix_pairs_file, tiny_model_dir, method, shared_prefix=True)
    assert gpu.shared_prefix and gpu.shared_prefix_flex
    assert "shared_prefix: True" in gpu.describe()
    eager = plan_for(make_recipe, prefix_pairs_file, tiny_model_dir, method, attention="eager", shared_prefix=True)
    assert eager.shared_prefix and not eager.shared_prefix_flex
    cpu = plan_for(make_recipe, prefix_pairs_file, tiny_model_dir, method, gpus=0, shared_prefix=True)
    assert cpu.shared_prefix and not cpu.shared_prefix_flex
    assert not plan_for(make_recipe, prefix_pairs_file, tiny_model_dir, method, shared_prefix=False).shared_prefix
    auto = plan_for(make_recipe, prefix_pairs_file, tiny_model_dir, method)
    assert auto.shared_prefix and auto.shared_prefix_flex
    assert any(note.startswith("shared_prefix: auto -> on") for note in auto.notes)
    for off, why in ((plan_for(make_recipe, prefix_pairs_file, tiny_model_dir, method, gpus=0), "CPU"),
                     (plan_for(make_recipe, prefix_pairs_file, tiny_model_dir, method, attention="eager"), "eager"),
                     (plan_for(make_recipe, prefix_pairs_file, tiny_model_dir, method, processes=2), "2 processes")):
        assert not off.shared_prefix and any(note.startswith(f"shared_prefix: auto -> off ({why}")
                                             for note in off.notes)


def test_flash_attention_and_other_methods_stay_unshared(make_recipe, prefix_pairs_file, tiny_model_dir,
                                                                shout_files):
    flash = plan_for(make_recipe, prefix_pairs_file, tiny_model_dir, "dpo", attention="flash_attention_2",
                     shared_prefix=True)
    assert not flash.shared_prefix
    assert any("shared_prefix: off with flash_attention_2" in note for note in flash.notes)
    assert not plan_for(make_recipe, shout_files[0], tiny_model_dir, "sft").shared_prefix


def recipe_sections(method: str, pairs: Path) -> dict:
    """method_sections for any method, with what a GRPO recipe needs to load (a batch of whole groups, a reward)."""
    sections = method_sections(method, pairs)
    if method == "grpo":
        sections["training"]["batch_size"] = 2
        sections["grpo"] = {"num_generations": 2, "rewards": [{"name": "json_valid"}]}
    return sections


@pytest.mark.parametrize("method", ["sft", "kto", "grpo"])
def test_shared_prefix_true_for_a_method_without_pairs_is_a_recipe_error(method, make_recipe, prefix_pairs_file):
    sections = recipe_sections(method, prefix_pairs_file)
    with pytest.raises(RecipeError) as caught:
        load_recipe(make_recipe(**sections, speed={"shared_prefix": True}))
    assert (f"speed.shared_prefix: applies to method dpo / orpo / simpo only (pairs of chosen and rejected rows); "
            f"this recipe trains with method: {method}") in str(caught.value)


@pytest.mark.parametrize("method", ["dpo", "kto", "grpo"])
def test_skip_padding_mask_true_for_a_method_other_than_sft_is_a_recipe_error(method, make_recipe,
                                                                              prefix_pairs_file):
    """speed.skip_padding_mask leans on trl's right-padded SFT batches: `true` for another method is refused (auto
    and false pass)."""
    sections = recipe_sections(method, prefix_pairs_file)
    with pytest.raises(RecipeError) as caught:
        load_recipe(make_recipe(**sections, speed={"skip_padding_mask": True}))
    assert (f"speed.skip_padding_mask: applies to method sft only (trl's right-padded SFT batches); this recipe "
            f"trains with method: {method}; set it to auto or false") in str(caught.value)
    for allowed in ("auto", False):
        assert load_recipe(make_recipe(**sections, speed={"skip_padding_mask": allowed})).method == method


# ------------------------------------------------------------------------------------------------ end to end


def test_qlora_kit_train_runs_a_dpo_recipe_with_shared_prefixes(make_recipe, prefix_pairs_file, caplog):
    from qlora_kit.cli import main

    sections = method_sections("dpo", prefix_pairs_file, batch_size=BATCH, logging_steps=1,
                               gradient_checkpointing=True)
    path = make_recipe("dpo-shared", **sections, speed={"shared_prefix": True})
    with caplog.at_level("INFO", logger="qlora_kit"):
        assert main(["train", str(path)]) == 0
    assert "speed.shared_prefix: each pair's common prefix runs once (a dense attention mask)" in caplog.text
    run_dir = load_recipe(path).run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["speed_plan"]["shared_prefix"] is True and summary["global_step"] == 2
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
