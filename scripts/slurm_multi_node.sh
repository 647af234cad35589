#!/usr/bin/env bash
# Multi-node qlora-kit training under SLURM: one `accelerate launch` per node, each starting one process per GPU.
#   sbatch --nodes=2 --gpus-per-node=8 scripts/slurm_multi_node.sh recipes/llama-3.1-8b.yaml [key=value ...]
# DDP by default; ACCELERATE_CONFIG=recipes/accelerate/fsdp_qlora.yaml (plus quantization.quant_storage=bf16 in the
# recipe or the overrides) for FSDP-QLoRA. training.output_dir must be on storage every node sees; resume a stopped
# job by submitting it again with training.resume=auto.
#SBATCH --job-name=qlora-kit
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
CONFIG=${ACCELERATE_CONFIG:-recipes/accelerate/multi_node.yaml}
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}  # "h100:8" -> 8
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads all: no SIGPIPE
MAIN_PORT=${MAIN_PORT:-29500}
# srun starts one task per node; each expands SLURM_NODEID itself (single quotes), so each node gets its own rank.
srun --kill-on-bad-exit=1 bash -c 'accelerate launch --config_file "$0" \
  --num_machines "$SLURM_NNODES" --num_processes "$(( SLURM_NNODES * $1 ))" --machine_rank "$SLURM_NODEID" \
  --main_process_ip "$2" --main_process_port "$3" --rdzv_backend static \
  train.py "${@:4}"' "$CONFIG" "$GPUS_PER_NODE" "$MAIN_HOST" "$MAIN_PORT" "$@"
