"""The run report: PNG plots of the logged metrics and report.md / report.html, written at the end of training and by
`qlora-kit report RUN_DIR`; and `training.report_to: [tensorboard]`, offline."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_kit.report import read_metrics, series
from qlora_kit.rundir import FOLDER_MANIFEST

PLOTS = ("loss.png", "learning_rate.png", "grad_norm.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def has_colour(path: Path, rgb: tuple[int, int, int], tolerance: int = 40) -> bool:
    """Whether any pixel is close to `rgb` (matplotlib's line colours: C0 blue, C1 orange)."""
    from PIL import Image

    pixels = Image.open(path).convert("RGB").getdata()
    return any(all(abs(p[i] - rgb[i]) <= tolerance for i in range(3)) for p in pixels)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora_kit", *args], capture_output=True, text=True, timeout=300)


def test_training_writes_the_three_plots_as_valid_pngs(finished_run):
    report = finished_run / "report"

    for name in PLOTS:
        width, height = png_size(report / name)
        assert (width, height) == (640, 360)
        assert (report / name).stat().st_size > 5_000  # axes, labels and a line, not an empty canvas


def test_loss_plot_draws_the_train_and_the_eval_loss(finished_run):
    records = read_metrics(finished_run)
    train, evaluation = series(records, "loss"), series(records, "eval_loss")
    assert [step for step, _ in train] == [5, 10, 15, 20, 25, 30]
    assert [step for step, _ in evaluation] == [10, 20, 30]

    loss_png = finished_run / "report" / "loss.png"
    assert has_colour(loss_png, (31, 119, 180))  # train loss, C0
    assert has_colour(loss_png, (255, 127, 14))  # eval loss, C1
    assert not has_colour(finished_run / "report" / "grad_norm.png", (255, 127, 14))  # one line only


def test_report_md_lists_the_final_loss_throughput_parameters_and_data(finished_run):
    text = (finished_run / "report" / "report.md").read_text()
    records = read_metrics(finished_run)
    summary = json.loads((finished_run / "summary.json").read_text())
    final_step, final_loss = series(records, "loss")[-1]

    assert f"| final train loss | {final_loss:.4g} (step {final_step}" in text
    assert f"| eval loss | {summary['eval_loss']:.4g} (perplexity" in text
    assert f"{summary['train_tokens_per_second']:.4g} tokens/s" in text
    assert "| peak GPU memory | n/a (no CUDA device) |" in text
    trainable, total = summary["trainable_parameters"], summary["total_parameters"]
    assert f"| trainable parameters | {trainable:,} of {total:,}" in text
    assert "| train | 32 |" in text and "| validation | 8 |" in text  # 40 rows, 8 held out
    assert "| exact_match | 8 |" in text  # the before/after generation table
    assert all(f"![{name[:-4].replace('_', ' ')}]({name})" in text for name in PLOTS)


def test_summary_records_trainable_parameters_and_data_statistics(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())

    # r=8 LoRA on all 7 linear layers of 2 layers (hidden 64, intermediate 128, 2 KV heads of 16)
    per_layer = 8 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 2 + (128 + 64))
    assert summary["trainable_parameters"] == 2 * per_layer
    assert summary["data"]["train"]["rows"] == 32
    assert summary["data"]["validation"]["length"]["max"] <= 64
    assert "lengths" not in summary["data"]["train"]  # per-row lists stay out of summary.json


def test_report_html_is_one_self_contained_file(finished_run):
    html = (finished_run / "report" / "report.html").read_text()

    assert html.startswith("<!doctype html>")
    assert html.count('src="data:image/png;base64,') == 3
    assert "<table>" in html and "final train loss" in html


def test_report_command_rebuilds_the_report_from_the_run_folder(finished_run, tmp_path):
    run = shutil.copytree(finished_run, tmp_path / finished_run.name)
    shutil.rmtree(run / "report")

    result = run_cli("report", str(run))

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(run / "report" / "report.md")
    assert {p.name for p in (run / "report").iterdir()} == {*PLOTS, "report.md", "report.html", FOLDER_MANIFEST}
    before = (finished_run / "report" / "report.md").read_text().splitlines()
    after = (run / "report" / "report.md").read_text().splitlines()
    assert [line for line in after if "Generated" not in line] == \
        [line.replace(str(finished_run), str(run)) for line in before if "Generated" not in line]


def test_report_on_a_folder_that_is_not_a_run_exits_2(tmp_path):
    result = run_cli("report", str(tmp_path))

    assert result.returncode == 2
    assert "not a qlora-kit run folder (no recipe.yaml)" in result.stderr


def test_report_of_an_interrupted_run_plots_what_was_logged(finished_run, tmp_path):
    from qlora_kit.report import write_report

    run = shutil.copytree(finished_run, tmp_path / "run", ignore=shutil.ignore_patterns("report", "summary.json"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["step"] <= 15]  # the run stopped after step 15 ...
    torn = '{"step": 20, "lo'  # ... while writing a line
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged) + torn)

    text = (write_report(run) / "report.md").read_text()

    assert "summary.json is missing" in text
    assert f"| final train loss | {logged[-1]['loss']:.4g} (step 15," in text


def test_lines_of_metrics_that_are_not_records_are_left_out_with_one_warning(finished_run, tmp_path, caplog):
    """A hand-edited or merged metrics.jsonl: a line that is not JSON, or JSON that is not an object (a number, a
    list), is left out of the plots with one warning that counts them; a torn last line stays quiet."""
    from qlora_kit.report import write_report

    run = shutil.copytree(finished_run, tmp_path / "run", ignore=shutil.ignore_patterns("report"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "5", "[1, 2]", "<<<<<<< HEAD", *lines[1:], '{"st']))

    with caplog.at_level("WARNING", logger="qlora_kit"):
        records = read_metrics(run)
        text = (write_report(run) / "report.md").read_text()

    assert records == [json.loads(line) for line in lines]
    warnings = [r.getMessage() for r in caplog.records if "not metric records" in r.getMessage()]
    assert warnings and warnings[0].endswith("3 line(s) are not metric records and were left out (line 2, 3, 4)")
    assert "final train loss" in text


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory, recipe_writer) -> Path:
    pytest.importorskip("tensorboard")
    from qlora_kit.pipeline import run_training
    from qlora_kit.recipe import load_recipe

    folder = tmp_path_factory.mktemp("tensorboard")
    recipe = recipe_writer(folder, "tb", training={"max_steps": 3, "report_to": ["tensorboard"]},
                           data={"cache": False}, export={"merge": False})
    run_training(load_recipe(recipe))
    return folder / "outputs" / "tb"


def test_report_to_tensorboard_logs_the_same_losses_offline(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = {p.parent for p in (tensorboard_run / "checkpoints" / "runs").rglob("events.out.tfevents.*")}
    assert len(event_dirs) == 1
    events = EventAccumulator(str(event_dirs.pop()))
    events.Reload()

    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    expected = series(read_metrics(tensorboard_run), "loss")
    assert [s for s, _ in logged] == [s for s, _ in expected] == [1, 2, 3]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert "tensorboard --logdir" in (tensorboard_run / "report" / "report.md").read_text()


def test_gpu_memory_fact_gives_the_allocated_peak_and_what_the_allocator_held(tmp_path):
    """CUDA graphs keep their pool's freed blocks, which allocated memory does not count: the report names both."""
    from qlora_kit.report import run_facts

    facts = {f.name: f.value for f in run_facts(tmp_path, [], {"peak_gpu_memory_gib": 20.04,
                                                             "peak_reserved_gpu_memory_gib": 22.07,
                                                             "trainable_parameters": 1, "total_parameters": 2})}
    assert facts["peak GPU memory"] == "20.04 GiB (torch.cuda.max_memory_allocated), 22.07 GiB held by the allocator"
    older = {f.name: f.value for f in run_facts(tmp_path, [], {"peak_gpu_memory_gib": 8.5,
                                                             "trainable_parameters": 1, "total_parameters": 2})}
    assert older["peak GPU memory"] == "8.50 GiB (torch.cuda.max_memory_allocated)"  # a summary from before
