"""`bench.py --method`: the preference and GRPO benchmarks run both paths on CPU (`--tiny`) and measure the same
thing on each: the same tokens per step, nonzero tokens/s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def run_bench(tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--tiny", "--out", str(out), "--work",
         str(tmp_path / "w"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "bench.json").read_text())["runs"]


def test_preference_rows_render_to_exact_prompt_and_answer_lengths(tmp_path):
    from bench_common import pair_lengths, preference_data

    info = preference_data(tmp_path, 2048, 4)
    assert pair_lengths(2048) == (1024, 512, 512)
    assert info["tokens_per_pair"] == 2 * 1024 + 512 + 512
    rows = [json.loads(line) for line in Path(info["path"]).read_text().splitlines()]
    assert len(rows) == 4 and all(r["prompt"][0]["role"] == "user" and r["chosen"][0]["role"] == "assistant"
                                  for r in rows)


@pytest.mark.slow
def test_bench_dpo_trains_the_same_tokens_per_step_on_both_paths(tmp_path):
    """The DPO bench: qlora-kit's CLI and the plain trl DPOTrainer count prompt + chosen and prompt + rejected of
    every pair, identical per step (nothing truncated, the same tokenization), and time them after the warm-up."""
    runs = run_bench(tmp_path, "--method", "dpo")
    assert [(r["method"], r["path"]) for r in runs] == [("dpo", "qlora-kit"), ("dpo", "reference")]
    pair = 2 * 64 + 32 + 32  # --tiny: seq 128 = prompt 64 + chosen 32 + rejected 32, batch 2, 4 steps
    for run in runs:
        assert run["error"] is None and run["tokens_per_second"] > 0 and run["measured_steps"] == 2
        assert run["tokens_per_step"] == [2 * pair] * 4, run["path"]
    ours, plain = runs
    assert ours["losses"][0] == pytest.approx(plain["losses"][0], abs=1e-4)  # log 2: policy = reference


@pytest.mark.slow
def test_bench_grpo_generates_the_same_completion_tokens_on_both_paths(tmp_path):
    """The GRPO bench: every step generates batch x max_completion_length tokens on both paths (min_new_tokens),
    each `generate` timed; generated tokens/s and the optimizer step's seconds are reported."""
    runs = run_bench(tmp_path, "--method", "grpo")
    assert [(r["method"], r["path"]) for r in runs] == [("grpo", "qlora-kit"), ("grpo", "reference")]
    for run in runs:
        assert run["error"] is None and run["tokens_per_second"] > 0, run
        assert run["generated_tokens"] == [4 * 32] * 4, run["path"]  # --tiny: batch 4, completions of 64 / 2
        assert run["seconds_per_step"] > run["generation_seconds_per_step"] > 0
