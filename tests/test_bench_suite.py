"""The GPU suite's dry run and the real-scale data-path bench run end to end on the CPU and write their JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE_BENCHES = ["finetune_memory", "mae_step", "mae_max_batch", "inference_real", "inference_real_bf16"]


def _env() -> dict[str, str]:
    # This checkout's mtl_breast first, one interpreter for the suite's scripts: the one running the tests.
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


def _positive(value, what: str) -> float:
    assert isinstance(value, int | float) and not isinstance(value, bool), f"{what}: {value!r} is not a number"
    assert math.isfinite(value) and value > 0, f"{what}: {value!r} is not finite and positive"
    return value


def _has(d: dict, keys: list[str], what: str) -> None:
    missing = [k for k in keys if k not in d]
    assert not missing, f"{what} lacks {missing}: {sorted(d)}"


@pytest.mark.slow
def test_gpu_suite_dry_run_writes_every_json_and_the_summary(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), str(out), "--dry-run"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=600)
    logs = {p.name: p.read_text()[-2000:] for p in out.glob("*.log")}
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs}"

    results = {name: json.loads((out / f"{name}.json").read_text()) for name in SUITE_BENCHES}
    for name, r in results.items():
        assert "error" not in r, (name, r)
        assert r["device"].startswith("cpu"), (name, r["device"])

    fm = results["finetune_memory"]
    _has(fm, ["benchmark", "device", "config", "memory_metric", "runs"], "finetune_memory")
    assert {(run["phases"], run["grad_checkpointing"]) for run in fm["runs"]} == {
        (3, True), (3, False), (6, True), (6, False)}
    for run in fm["runs"]:
        _has(run, ["estimate_gib", "measured_gib", "relative_error", "step_s_median"], "finetune run")
        _positive(run["estimate_gib"], "estimate_gib")
        _positive(run["measured_gib"], "measured_gib")
        # The CPU trace and the fake-tensor estimate follow the same allocations at test size.
        assert abs(run["relative_error"]) <= 0.15, run

    mae = results["mae_step"]
    _has(mae, ["ours", "monai", "ours_vs_monai", "peak_bf16_tflops", "peak_source", "token_definition",
               "flops_method", "mfu_assumption"], "mae_step")
    for name in ("ours", "monai"):
        _has(mae[name], ["step_ms_median", "tokens_per_s", "volumes_per_s", "flops_per_step", "achieved_tflops",
                         "mfu"], f"mae_step {name}")
        for key in ("step_ms_median", "tokens_per_s", "volumes_per_s", "flops_per_step", "mfu"):
            _positive(mae[name][key], f"mae_step {name}.{key}")
    assert mae["ours"]["tokens_per_volume"] == mae["config"]["phases"] * mae["monai"]["tokens_per_volume"]
    _positive(mae["ours_vs_monai"]["tokens_per_s_ratio"], "tokens_per_s_ratio")

    mb = results["mae_max_batch"]
    _has(mb, ["largest_batch", "peak_gib_by_batch", "memory_metric", "volumes_per_s", "mfu", "peak_source"],
         "mae_max_batch")
    assert "traced" in mb["memory_metric"]  # the measured search path, not the fit-check estimate
    _positive(mb["largest_batch"], "largest_batch")
    peaks = {int(b): v for b, v in mb["peak_gib_by_batch"].items()}
    assert peaks[mb["largest_batch"]] <= mb["limit_gib"]
    assert any(b > mb["largest_batch"] and v > mb["limit_gib"] for b, v in peaks.items())  # the bound was found
    _positive(mb["mfu"], "max batch mfu")

    for name in ("inference_real", "inference_real_bf16"):
        _has(results[name], ["case_s_median", "windows_per_pass", "config"], name)
        _positive(results[name]["case_s_median"], f"{name}.case_s_median")
    assert results["inference_real_bf16"]["config"]["bf16"] is True

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["failed"] == []
    assert set(summary["runs"]) == set(SUITE_BENCHES)
    rows = summary["rows"]
    assert len(rows) == 8 + 3 + 2 + 2
    assert all(row["verdict"] in ("met", "missed", "reported") for row in rows), rows
    md = (out / "summary.md").read_text()
    assert "| figure | value | target | met? | device |" in md
    table = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(table) == len(rows) and all("(dry-run)" in line for line in table)


def test_real_scale_writes_json_with_every_figure(tmp_path):
    out = tmp_path / "real_scale.json"
    cmd = [sys.executable, str(ROOT / "bench" / "real_scale.py"), "--size", "32", "--cases", "2", "--crop", "32",
           "--loader-batches", "2", "--loader-workers", "2", "--models", "mtl_vit_test", "--predict-cases", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    _has(r, ["benchmark", "device", "config", "rss_method", "synth", "preprocess", "cache", "loader", "predict",
             "seconds"], "real_scale")
    assert r["device"].startswith("cpu")
    rss = ["peak_rss_mb", "peak_tree_rss_mb"]

    assert set(r["preprocess"]) == {"workers_1", "workers_2"}
    for key, step in r["preprocess"].items():
        assert step["cases"] == 2, step
        for k in ["cases_per_min", *rss]:
            _positive(step[k], f"preprocess {key}.{k}")
    # Two spawned workers: the process tree holds more than the parent alone, and a worker's own peak is known.
    parallel = r["preprocess"]["workers_2"]
    _positive(parallel["peak_workers_rss_mb"], "preprocess workers_2 peak_workers_rss_mb")
    _positive(parallel["peak_worker_rss_mb"], "preprocess workers_2 peak_worker_rss_mb")
    assert parallel["peak_tree_rss_mb"] > parallel["peak_rss_mb"]

    cache = r["cache"]
    _positive(cache["bytes_per_case"], "bytes_per_case")
    assert cache["extrapolated_cases"] == 1506
    assert cache["extrapolated_gb"] == pytest.approx(cache["bytes_per_case"] * 1506 / 1e9, abs=0.01)
    assert len(cache["mean_shape_TDHW"]) == 4

    # Two loader workers (the 0-worker run goes through the same code with another number; left out for time).
    assert set(r["loader"]) == {"workers_2"}
    step = r["loader"]["workers_2"]
    assert step["batch_shape_BTDHW"][0] == 2 and step["batch_shape_BTDHW"][2:] == [32, 32, 32], step
    for k in ["samples_per_s", "first_batch_s", "peak_workers_rss_mb", *rss]:
        _positive(step[k], f"loader workers_2.{k}")

    step = r["predict"]["mtl_vit_test"]
    assert step["cases"] == 1 and step["roi"] == [32, 32, 32]
    for k in ["validation_s_per_case", "predict_s_per_case", *rss]:
        _positive(step[k], f"predict.{k}")
