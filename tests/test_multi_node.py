"""The SLURM launcher starts one `accelerate launch` per node with the right ranks, process count and rendezvous."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def fake(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_slurm_script_launches_each_node_with_its_rank_and_the_global_process_count(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "launches.txt"
    fake(bin_dir, "scontrol", 'printf "node-a\\nnode-b\\n"\n')
    # srun runs its command once per node, as SLURM would, with that node's id
    fake(bin_dir, "srun", 'shift; for id in 0 1; do SLURM_NODEID=$id "$@"; done\n')
    fake(bin_dir, "accelerate", f'echo "$*" >> {log}\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "h100:8"}
    done = subprocess.run(["bash", "scripts/slurm_multi_node.sh", "recipes/quickstart.yaml", "lora.r=32",
                           "data.system_prompt=Be brief."], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    launches = log.read_text().splitlines()
    assert len(launches) == 2
    for rank, line in enumerate(launches):
        assert line.startswith("launch --config_file recipes/accelerate/multi_node.yaml --num_machines 2 "
                               f"--num_processes 16 --machine_rank {rank} --main_process_ip node-a "
                               "--main_process_port 29500 --rdzv_backend static train.py recipes/quickstart.yaml "
                               "lora.r=32 data.system_prompt=Be brief."), line


def test_multi_node_config_is_a_data_parallel_accelerate_config() -> None:
    config = yaml.safe_load((ROOT / "recipes" / "accelerate" / "multi_node.yaml").read_text())
    assert config["distributed_type"] == "MULTI_GPU" and config["num_machines"] >= 2
    assert {"main_process_ip", "main_process_port", "machine_rank"} <= set(config)
