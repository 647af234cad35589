"""Training speed-ups and memory savers, each behind a `speed.*` recipe switch and measured by scripts/bench.py.

plan.py           the SpeedPlan: every choice decided once (recipe + model config + machine), applied in one place
lora_autograd.py  the fused LoRA layers' autograd functions (forward equation and gradients in each docstring)
nf4_triton.py     bitsandbytes' NF4 dequantize as one Triton kernel
checkpointing.py  reentrant and CPU-offloaded checkpoint functions
generation.py     GRPO's sampling on merged compute-dtype copies of the 4-bit LoRA layers (generation_weights: bf16)
cuda_graphs.py    decoder layers' training forward and backward replayed as CUDA graphs (batches of one shape)
shared_prefix.py  DPO / ORPO / SimPO pairs with their common prefix run once (packed rows, pair masks)
patches.py        every bend of transformers / trl / peft / bitsandbytes / accelerate, with its table
"""

from __future__ import annotations

from qlora_kit.speed.patches import bend_trainer, modeling_module_restored, train_on_one_gpu_without_a_launcher
from qlora_kit.speed.plan import ApplySpeedPlan, Machine, SpeedPlan, decide_speed_plan

__all__ = ["ApplySpeedPlan", "Machine", "SpeedPlan", "bend_trainer", "decide_speed_plan", "modeling_module_restored",
           "train_on_one_gpu_without_a_launcher"]
