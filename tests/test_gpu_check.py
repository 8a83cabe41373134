"""benchmarks/gpu_check.py: its report and table, and every part run small on the CPU (--dry-run)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402


def _arm(s):
    return {"s_per_iter": s, "images_per_s": 2 / s, "peak_mb": 1000 * s, "train_gflops": 1.0}


def test_the_table_shows_every_part_and_the_targets():
    report = {
        "mode": "GPU, cuda", "seconds": 300.0, "errors": {"swin": "RuntimeError: CUDA out of memory"},
        "environment": {"gpu": "NVIDIA H200", "torch": "2.14.1", "cuda": "13.0", "lgd": "0.1.0"},
        "tests": {"ok": False, "summary": "1 failed, 6 passed in 50.00s", "failures": ["FAILED tests/test_cuda.py::x"]},
        "retinanet": {"preset": "retinanet-r50-2x", "images": 2, "size": 800, "iters": 200,
                      "baseline_fp32": _arm(0.1), "lgd_fp32": _arm(0.2), "baseline_bf16": _arm(0.05),
                      "lgd_bf16": _arm(0.12), "lgd_over_baseline_fp32": 2.0, "lgd_over_baseline_bf16": 2.4,
                      "lgd_bf16_over_baseline_fp32": 1.2},
        "launch": {"ok": True, "expected_backend": "nccl", "backend": "nccl", "all_reduce": True,
                   "all_gather": True, "ddp_steps": 2, "train_summary": {"iterations": 4}},
    }
    text = gpu_check.render_markdown(report)
    assert "NVIDIA H200" in text and "1 failed, 6 passed" in text and "FAILED tests/test_cuda.py::x" in text
    assert "| lgd | bf16 | 0.1200 | 16.7 | 120 MB | 2.40x |" in text
    assert "LGD bf16 / baseline fp32: 1.20x (target: at most 1.6x)" in text
    assert "**1-process launch** (nccl): ok" in text and "**swin** FAILED: RuntimeError" in text


def test_without_cuda_only_the_dry_run_runs(monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert gpu_check.main(["--out", "/nonexistent/never-written"]) == 2
    assert "--dry-run" in capsys.readouterr().err


@pytest.mark.slow
def test_dry_run_runs_every_part_on_the_cpu(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert not report["errors"] and "tests" not in report
    r = report["retinanet"]
    for key in ("baseline_fp32", "lgd_fp32", "baseline_bf16", "lgd_bf16"):
        assert r[key]["s_per_iter"] > 0 and r[key]["peak_mb"] > 0, key
    assert r["lgd_fp32"]["train_gflops"] > r["baseline_fp32"]["train_gflops"]
    assert report["swin"]["plain"]["peak_mb"] > 0 and report["swin"]["checkpointed"]["peak_mb"] > 0
    launch = report["launch"]
    assert launch["ok"] and launch["backend"] == "gloo" and launch["ddp_steps"] == 2
    assert launch["train_summary"]["iterations"] == 4
    assert "| lgd | bf16 |" in (tmp_path / "gpu-check.md").read_text()
