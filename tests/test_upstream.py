"""The upstream names qlora-kit bends or reads (qlora_kit/speed/patches.py's table) still exist, and the guards around
them fail loudly, naming the versions qlora-kit was checked against, instead of training through the wrong path."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch

from qlora_kit.recipe import QloraKitError, load_recipe


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir, recipe_writer, tmp_path_factory):
    """The tiny Llama in NF4 with LoRA on every linear, as the pipeline builds it."""
    from qlora_kit.model import build_quantized_model

    recipe = load_recipe(recipe_writer(tmp_path_factory.mktemp("upstream"), "tiny"))
    return build_quantized_model(recipe, str(tiny_model_dir), torch.float32)


def test_transformers_trainer_and_training_arguments_keep_what_qlora_kit_replaces(tmp_path):
    from transformers import PreTrainedModel, Trainer, TrainingArguments

    for name in ("_clip_grad_norm", "floating_point_ops", "train", "_track_num_input_tokens"):
        assert callable(getattr(Trainer, name)), f"transformers.Trainer.{name}"
    assert callable(PreTrainedModel.train)
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    assert trainer.is_fsdp_enabled is False
    assert callable(trainer.accelerator.clip_grad_norm_)
    assert trainer.callback_handler.callbacks
    assert trainer.args.n_gpu == trainer.args._n_gpu


def test_transformers_decoder_layers_checkpoint_through_the_attributes_qlora_kit_sets(peft_model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    assert GradientCheckpointingLayer.gradient_checkpointing is False  # the class default the bends read
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in peft_model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(layers) == 2 and all(m.gradient_checkpointing and callable(m._gradient_checkpointing_func)
                                    for m in layers)


def test_peft_lora_layers_over_4bit_weights_have_what_the_fused_path_reads(peft_model):
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.lora.bnb import Linear4bit

    from qlora_kit.speed.patches import PEFT_LAYER_ATTRIBUTES

    assert callable(Linear4bit.forward)
    layers = [m for m in peft_model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14
    for name in (*PEFT_LAYER_ATTRIBUTES, "get_base_layer"):
        assert hasattr(layers[0], name), f"peft Linear4bit.{name}"
    assert isinstance(layers[0].lora_variant, dict)
    tuner = PEFT_TYPE_TO_TUNER_MAPPING[peft_model.peft_config["default"].peft_type]
    assert callable(tuner._remove_adapter_name_from_key)


def test_bitsandbytes_4bit_layers_have_what_the_fused_path_and_the_cpu_layout_read(peft_model):
    import bitsandbytes as bnb

    base = next(m for m in peft_model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert base.support_avx512bf16_for_cpu is False  # set by model.keep_4bit_weights_in_training_layout
    assert base.compute_dtype is not None
    state = base.weight.quant_state
    for name in ("absmax", "code", "blocksize", "nested", "quant_type", "dtype", "shape", "offset", "state2"):
        assert hasattr(state, name), f"bitsandbytes QuantState.{name}"
    assert callable(bnb.functional.dequantize_4bit) and callable(bnb.matmul_4bit)


def test_trl_accelerate_and_torch_keep_the_names_qlora_kit_uses():
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from trl import SFTConfig, SFTTrainer

    assert SFTTrainer and "use_liger_kernel" in SFTConfig.__dataclass_fields__
    # speed.generation_weights: the GRPO trainer wraps the generate step, reading the flags of its other two paths
    from trl import GRPOTrainer

    assert list(inspect.signature(GRPOTrainer._generate_single_turn).parameters)[:2] == ["self", "prompt_ids"]
    source = inspect.getsource(GRPOTrainer)
    for name in ("self.use_vllm =", "self.use_transformers_continuous_batching =", "self._metrics ="):
        assert name in source, f"trl GRPOTrainer: {name}"
    # trainers.ChunkedPairLogProbs: ORPO's / CPO's concatenated_forward rebuilt over trl's fused LM head
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer
    from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head

    assert {"log_probs", "mean_logits", "label_mask", "aux_loss"} <= FusedCausalLMOutput.__dataclass_fields__.keys()
    assert "outputs" in inspect.signature(add_fused_lm_head).parameters
    for trainer, padding in ((ORPOTrainer, "self.padding_value ="), (CPOTrainer, "self.pad_token_id =")):
        source = inspect.getsource(trainer)
        for name in (padding, "self.aux_loss_enabled =", "self.is_encoder_decoder =", "def concatenated_inputs("):
            assert name in source, f"trl {trainer.__name__}: {name}"
    assert "self.cpo_alpha =" in inspect.getsource(CPOTrainer)
    assert "average_log_prob=self.loss_type in [\"ipo\", \"simpo\"]" in inspect.getsource(CPOTrainer)
    assert callable(Accelerator.clip_grad_norm_) and DistributedType.NO and DistributedType.MULTI_GPU
    assert torch._C._current_graph_task_id() == -1  # outside backward
    assert callable(torch.cuda.get_per_process_memory_fraction)
    assert callable(torch.compiler.is_compiling)
    # speed.fp8_matmul: float8 e4m3 and rowwise-scaled _scaled_mm (scale_a [M, 1], scale_b [1, N], bf16 out)
    assert torch.float8_e4m3fn.itemsize == 1 and torch.finfo(torch.float8_e4m3fn).max == 448.0
    arguments = [argument.name for argument in torch.ops.aten._scaled_mm.default._schema.arguments]
    assert arguments[:4] == ["self", "mat2", "scale_a", "scale_b"] and "out_dtype" in arguments


def test_a_peft_layer_without_lora_variant_stops_the_fused_path_instead_of_hiding_dora(make_recipe, tiny_model_dir):
    """peft keeps DoRA (and other variants) in `lora_variant`; without that attribute a DoRA layer would silently run
    as plain LoRA. Fused LoRA refuses to start instead."""
    from peft.tuners.lora.bnb import Linear4bit

    from qlora_kit.model import build_quantized_model
    from qlora_kit.speed.patches import use_fused_lora

    recipe = load_recipe(make_recipe(lora={"use_dora": True}))
    model = build_quantized_model(recipe, str(tiny_model_dir), torch.float32)
    layer = next(m for m in model.modules() if isinstance(m, Linear4bit))
    assert "default" in layer.lora_variant  # where peft 0.21 keeps DoRA
    del layer.lora_variant
    with pytest.raises(QloraKitError, match=r"peft's Linear4bit has no lora_variant: .*peft 0.21.2"):
        use_fused_lora(model)


def test_a_checkpointing_module_without_transformers_checkpoint_function_is_refused(peft_model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    from qlora_kit.speed.checkpointing import reentrant_checkpoint
    from qlora_kit.speed.patches import use_checkpoint_function

    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layer = next(m for m in peft_model.modules() if isinstance(m, GradientCheckpointingLayer))
    del layer._gradient_checkpointing_func
    with pytest.raises(QloraKitError, match="without transformers' _gradient_checkpointing_func"):
        use_checkpoint_function(peft_model, reentrant_checkpoint)
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # restored


def test_several_gpus_without_a_launcher_train_on_the_first(tmp_path, caplog):
    from transformers import TrainingArguments

    from qlora_kit.speed.patches import train_on_one_gpu_without_a_launcher

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    args._n_gpu = 2  # what transformers counts on a machine with two visible GPUs and no launcher
    with caplog.at_level(logging.WARNING, logger="qlora_kit"):
        train_on_one_gpu_without_a_launcher(args)
    assert args.n_gpu == 1
    assert "2 GPUs visible but no launcher" in caplog.text


def test_names_swapped_in_the_modeling_module_are_put_back_when_training_ends(tmp_path):
    """Liger replaces module-level functions such as `modeling_llama.apply_rotary_pos_emb` for the whole process;
    after training a model built later must run transformers' own code again (a CPU merge check after a GPU run)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    from qlora_kit.speed import modeling_module_restored

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=32))
    original_rope, original_norm = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm

    def liger_like_rope(*args, **kwargs):
        raise AssertionError("a Triton kernel on CPU tensors")

    try:
        with modeling_module_restored(model):
            modeling_llama.apply_rotary_pos_emb = liger_like_rope  # what Liger does while the trainer sets up
            modeling_llama.LlamaRMSNorm = type("Swapped", (), {})
        assert modeling_llama.apply_rotary_pos_emb is original_rope
        assert modeling_llama.LlamaRMSNorm is original_norm
    finally:
        modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm = original_rope, original_norm


def test_transformers_decoders_take_what_the_shared_prefix_forward_passes(peft_model):
    """speed.shared_prefix calls the decoder (get_decoder) with a prepared 4D mask, or a {layer type: mask} mapping
    for models with sliding-window layers, and position_ids; its GPU path registers an attention function and a mask
    builder under its own name and switches the model to it."""
    import inspect

    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.models.gemma2 import modeling_gemma2
    from transformers.models.qwen2 import modeling_qwen2

    decoder = peft_model.get_decoder()
    assert type(decoder).__name__ == "LlamaModel"
    parameters = inspect.signature(type(decoder).forward).parameters
    assert list(parameters)[1:4] == ["input_ids", "attention_mask", "position_ids"]
    for module in (modeling_gemma2, modeling_qwen2):  # a prepared mapping is taken as it is
        assert "isinstance(causal_mask_mapping := attention_mask, dict)" in inspect.getsource(module)
    assert callable(AttentionInterface.register) and callable(AttentionMaskInterface.register)
    assert callable(sdpa_mask) and callable(sdpa_attention_forward) and callable(peft_model.set_attn_implementation)
    assert callable(flex_attention) and callable(create_block_mask) and BlockMask
