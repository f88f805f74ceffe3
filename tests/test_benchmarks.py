"""The benchmark scripts still run end to end (tiny settings: their figures mean nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
pytestmark = pytest.mark.slow


def bench(script: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(BENCHMARKS / script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900)


def test_job_quality_trains_and_writes_its_table(tmp_path):
    tiny = ["trainer.max_epochs=1", "trainer.limit_batches=2", "trainer.num_workers=1"]
    out = bench(
        "job_quality.py", "--jobs", "mlp_tabular", "--out", str(tmp_path),
        *(f"--override={o}" for o in tiny),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    (row,) = json.loads((tmp_path / "job_quality.json").read_text())
    assert row["job"] == "mlp_tabular" and 0 <= row["value"] <= 1 and "met" in row
    assert "baseline/logreg_acc" in row["metrics"]
    assert "| mlp_tabular | val/acc |" in (tmp_path / "job_quality.md").read_text()


def test_sweep_efficiency_runs_both_sweeps_and_writes_its_table(tmp_path):
    out = bench("sweep_efficiency.py", "--tiny", "--epochs", "2", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    results = json.loads((tmp_path / "sweep_efficiency.json").read_text())
    assert results["grid"]["trials"] == 2 and results["asha"]["trials"] == 2
    assert results["grid"]["trial_epochs"] == 4  # the grid runs every trial to the end
    assert "| asha | 2 |" in (tmp_path / "sweep_efficiency.md").read_text()


def test_raytrain_baseline_runs_the_torchrun_loop_under_ray_train():
    # B1's third side; performance.py runs it on its head, here it starts an embedded Ray.
    out = bench(
        "raytrain_baseline.py", "--workers", "2",
        "--", "--job", "cnn_digits", "--epochs", "2", "--limit-batches", "2",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("BASELINE_RESULT "))
    result = json.loads(line.split(" ", 1)[1])
    assert result["world_size"] == 2 and len(result["peak_rss_mb"]) == 2
    assert len(result["samples_per_s"]) == 2 and all(r > 0 for r in result["samples_per_s"])
    assert 0 < result["first_step_s"] < result["train_end_s"]


def test_performance_runs_orchestrate_beside_torchrun_and_writes_its_table(tmp_path):
    # B2 (with B6) exercises every moving part: a private Ray head (warm), an embedded Ray
    # (cold), the torchrun baseline, figures read back through MlflowClient, RSS sampling.
    out = bench("performance.py", "--tiny", "--only", "B2", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    results = json.loads((tmp_path / "performance.json").read_text())
    for side in ("cold", "warm"):
        assert results["B2"][side]["first_step_ratio"]["n"] == 1
        assert (
            0
            < results["B2"][side]["first_step_s"]["median"]
            < results["B2"][side]["wall_s"]["median"]
        )
    assert len(results["B6"]["orchestrate"]["worker_max_mb"]["values"]) == 1
    assert results["B6"]["torchrun"]["worker_ru_maxrss_mb"]["median"] > 0
    table = (tmp_path / "performance.md").read_text()
    assert "| B2 | launch → first optimizer step, cold" in table
    assert "| B6 | peak RSS, largest worker" in table
    phases = results["B2"]["cold"]["phases_s"]  # where the start-up went, from the run itself
    assert list(phases) == ["fit_called", "worker_entered", "data_built", "model_built",
                            "time_to_first_step"]  # fmt: skip
    assert "| B2 | worker-side split, cold" in table


def test_gpu_benchmark_runs_both_g1_sides_in_its_tiny_configuration(tmp_path):
    # G1 and G2 need a CUDA GPU; --tiny runs every part on the CPU (G1's two sides, the
    # orchestrator's loop and the torchrun script; G2's orchestrate run), so the script cannot
    # rot between GPU sessions.
    out = bench("gpu.py", "--tiny", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads((tmp_path / "gpu.json").read_text())
    g1 = result["G1"]
    (pair,) = g1["pairs"]
    assert len(pair["ours"]["samples_per_s"]) == len(pair["theirs"]["samples_per_s"]) == 2
    assert g1["ours_tokens_per_s"] > 0 and g1["theirs_tokens_per_s"] > 0
    assert g1["ours_mfu"] is None  # no bf16 peak for a CPU
    assert result["G2"]["baseline_backend"] == "gloo"
    # G2's Ray Train half runs too, on the CPU: gloo there (nccl on a GPU).
    run = result["G2"]["orchestrated"]
    assert run == {"measured": True, "status": "FINISHED", "backend": "gloo", "device": "cpu"}
    table = (tmp_path / "gpu.md").read_text()
    assert "| G1 | tokens/s, orchestrator's loop / hand-written" in table


def test_gpu_benchmark_without_a_gpu_says_so():
    out = bench("gpu.py", "--out", "/nonexistent")
    assert out.returncode != 0 and "no CUDA GPU here" in out.stderr, out.stderr


def test_gpu_benchmark_counts_flops_and_knows_the_cards_peaks():
    sys.path.insert(0, str(BENCHMARKS))
    import gpu

    # PaLM's count per token, 6 · N + 12 · L · T · d, at GPT-2 small's size (N ≈ 85 M).
    assert gpu.flops_per_token(85_000_000, 12, 1024, 768) == 510_000_000 + 113_246_208
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert gpu.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu.peak_flops("NVIDIA H200") == 989.4e12
    assert gpu.peak_flops("some other card") is None
