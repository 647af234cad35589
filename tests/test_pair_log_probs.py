"""ORPO and SimPO (trl.experimental ORPO / CPO) score their pairs through trl's fused LM head
(trainers.ChunkedPairLogProbs): the loss, every LoRA gradient and the logged metrics of trl's own
concatenated_forward on the same batch (rows of unequal length, shared prefixes on and off), without a tensor of
vocabulary width over every position."""

from __future__ import annotations

import pytest
import test_shared_prefix
import torch
from test_methods import loss_and_adapter_gradients
from test_shared_prefix import BATCH, assert_same_loss_and_gradients, pair_trainer

family_folder = test_shared_prefix.family_folder  # the tiny family models and the pairs with shared prefixes
prefix_pairs_file = test_shared_prefix.prefix_pairs_file

# (method, preference.cpo_alpha): SimPO without and with CPO's NLL term on the chosen answers
CASES = [("orpo", None), ("simpo", 0.0), ("simpo", 0.5)]
LOGGED_LOGIT_MEANS = ("logits/chosen", "logits/rejected")


def trl_concatenated_forward(method: str):
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    return {"orpo": ORPOTrainer, "simpo": CPOTrainer}[method].concatenated_forward


def scoring_trainer(method: str, cpo_alpha: float | None, share: bool, trl_forward: bool, family_folder,
                    make_recipe, prefix_pairs_file, tokenizer, run_dir, monkeypatch, family: str = "llama"):
    """qlora-kit's pair trainer on a tiny family model, the Llama by default (fused LoRA, a kept and a checkpointed
    layer); with `trl_forward` its concatenated_forward is trl's own (full logits), as in trl's unpatched trainer."""
    trainer = pair_trainer(method, family, share, "non-reentrant", family_folder(family), make_recipe,
                           prefix_pairs_file, tokenizer, run_dir)
    if cpo_alpha is not None:
        trainer.cpo_alpha = cpo_alpha  # CPOConfig.cpo_alpha, read by trl at each loss
    if trl_forward:
        monkeypatch.setattr(type(trainer), "concatenated_forward", trl_concatenated_forward(method))
    return trainer


def first_batch(trainer) -> dict:
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)]))


def loss_gradients_and_metrics(trainer, batch: dict) -> tuple[torch.Tensor, dict, dict[str, float]]:
    trainer._stored_metrics.clear()  # trl's per-step metric lists, logged (averaged) with the loss
    loss, grads = loss_and_adapter_gradients(trainer, batch)
    return loss, grads, {key: values[-1] for key, values in trainer._stored_metrics["train"].items()}


def logit_means_over_scored_tokens(trainer, method: str, batch: dict) -> tuple[float, float]:
    """The logged `logits/chosen|rejected` as ChunkedPairLogProbs defines them, from the model's full logits: the
    vocabulary mean of each next-token logit, averaged over the tokens scored (ORPO: every attended token; CPO: the
    answer labels)."""
    rows = trainer.concatenated_inputs(batch, padding_value=trainer.pair_log_prob_settings().padding_value,
                                       device=trainer.accelerator.device)
    ids, mask, labels = (rows[f"concatenated_{key}"] for key in ("input_ids", "attention_mask", "labels"))
    with torch.no_grad():
        means = trainer.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].mean(-1)
    scored = mask[:, 1:] == 1 if method == "orpo" else labels[:, 1:] != -100
    chosen = ids.shape[0] // 2
    return means[:chosen][scored[:chosen]].mean().item(), means[chosen:][scored[chosen:]].mean().item()


@pytest.mark.parametrize("share", [False, True], ids=["unshared", "shared-prefix"])
@pytest.mark.parametrize(("method", "cpo_alpha"), CASES)
def test_orpo_and_simpo_give_trl_s_loss_gradients_and_metrics_through_the_fused_lm_head(
        method, cpo_alpha, share, family_folder, make_recipe, prefix_pairs_file, tiny_tokenizer, tmp_path,
        monkeypatch):
    """fp32 on CPU: trl's unpatched concatenated_forward (unshared) against ChunkedPairLogProbs, shared prefixes off
    and on. The logged logit means are over the scored tokens (padding left out), checked against the full logits."""
    args = (family_folder, make_recipe, prefix_pairs_file, tiny_tokenizer)
    plain = scoring_trainer(method, cpo_alpha, False, True, *args, tmp_path / "plain", monkeypatch)
    ours = scoring_trainer(method, cpo_alpha, share, False, *args, tmp_path / "ours", monkeypatch)
    batch = first_batch(ours)
    lengths = torch.cat([batch["chosen_attention_mask"].sum(1), batch["rejected_attention_mask"].sum(1)])
    assert len(set(lengths.tolist())) > 1  # rows of unequal length: padding in the batch

    plain_loss, plain_grads, plain_metrics = loss_gradients_and_metrics(plain, batch)
    loss, grads, metrics = loss_gradients_and_metrics(ours, batch)

    assert_same_loss_and_gradients(loss, grads, plain_loss, plain_grads)
    assert metrics.keys() == plain_metrics.keys()
    assert (metrics["nll_loss"] != 0) == (cpo_alpha != 0)  # ORPO's and CPO's NLL term ran (or is trl's constant 0)
    for key, value in plain_metrics.items():
        if key not in LOGGED_LOGIT_MEANS:
            assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    expected = logit_means_over_scored_tokens(ours, method, batch)
    assert (metrics["logits/chosen"], metrics["logits/rejected"]) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "mistral"])
def test_orpo_through_the_fused_lm_head_gives_trl_s_loss_and_gradients_on_other_families(
        family, family_folder, make_recipe, prefix_pairs_file, tiny_tokenizer, tmp_path, monkeypatch):
    """The fused head applies what each family's own head does (Gemma 2's final logit softcapping, Qwen2's biased
    projections beneath it, Mistral's sliding windows): ORPO's loss and every LoRA gradient equal trl's full-logit
    path on the same batch."""
    args = (family_folder, make_recipe, prefix_pairs_file, tiny_tokenizer)
    plain = scoring_trainer("orpo", None, False, True, *args, tmp_path / "plain", monkeypatch, family)
    ours = scoring_trainer("orpo", None, False, False, *args, tmp_path / "ours", monkeypatch, family)
    batch = first_batch(ours)
    plain_loss, plain_grads, _ = loss_gradients_and_metrics(plain, batch)
    loss, grads, _ = loss_gradients_and_metrics(ours, batch)
    assert_same_loss_and_gradients(loss, grads, plain_loss, plain_grads)


@pytest.mark.parametrize(("method", "cpo_alpha"), [("orpo", None), ("simpo", 0.5)])
def test_no_tensor_of_vocabulary_width_over_every_position_is_made_or_kept_for_backward(
        method, cpo_alpha, family_folder, make_recipe, prefix_pairs_file, tiny_tokenizer, tmp_path, monkeypatch):
    """The LM head module never runs (the fused head reads its weight in tiles) and autograd keeps no [rows,
    positions, vocab]-sized tensor; trl's own concatenated_forward does both, so removing the fused head fails here."""
    args = (family_folder, make_recipe, prefix_pairs_file, tiny_tokenizer)
    seen = {trl_forward: head_calls_and_full_width_saved_tensors(scoring_trainer(
        method, cpo_alpha, False, trl_forward, *args, tmp_path / str(trl_forward), monkeypatch))
        for trl_forward in (True, False)}
    assert seen[True][0] and seen[True][1]  # the check sees trl's full logits
    assert seen[False] == ([], [])


def head_calls_and_full_width_saved_tensors(trainer) -> tuple[list[tuple], list[tuple]]:
    """Output shapes of the LM head module's calls, and shapes of the tensors autograd saved that are vocabulary wide
    over every position of the batch (or more), in one loss and backward on the first batch."""
    batch = first_batch(trainer)
    rows = 2 * batch["chosen_input_ids"].shape[0]
    positions = rows * (max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1]) - 1)
    vocab = trainer.model.config.vocab_size
    head_calls: list[tuple] = []
    full_width: list[tuple] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() and tensor.shape[-1] == vocab and tensor.numel() >= positions * vocab:
            full_width.append(tuple(tensor.shape))
        return tensor

    hook = trainer.model.get_output_embeddings().register_forward_hook(
        lambda module, inputs, output: head_calls.append(tuple(output.shape)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss_and_adapter_gradients(trainer, batch)
    finally:
        hook.remove()
    return head_calls, full_width
