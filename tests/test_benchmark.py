"""`lgd benchmark` measures both arms and writes every key with sane values."""
import pytest

from lgd_cli.engine.benchmark import run_benchmark
from lgd_cli.config.build import build_config
from tests.helpers import run_cli

REQUIRED = ["train.baseline_s_per_iter", "train.lgd_s_per_iter", "train.lgd_over_baseline",
            "memory.baseline_peak_mb", "memory.lgd_peak_mb", "params.student", "params.lgd_only",
            "inference.eager_ms_per_image", "flops.lgd_over_baseline"]


@pytest.mark.slow
def test_benchmark_reports_positive_numbers_for_every_key(tiny_overrides):
    cfg = build_config("demo", tiny_overrides, device="cpu")
    result = run_benchmark(cfg, iters=2, warmup=1, export=True)
    assert result["precision"] == "fp32"
    for dotted in REQUIRED:
        section, key = dotted.split(".")
        assert result[section][key] > 0, dotted
    assert result["inference"]["torchscript_ms_per_image"] > 0 and result["inference"]["onnx_over_eager"] > 0
    # LGD adds a second head pass and the teacher: more FLOPs and parameters, never fewer.
    assert result["flops"]["lgd_over_baseline"] > 1.0
    assert result["params"]["lgd_only"] > 0 and result["params"]["student"] > result["params"]["lgd_only"] / 10
    assert result["train"]["lgd_over_baseline"] == pytest.approx(
        result["train"]["lgd_s_per_iter"] / result["train"]["baseline_s_per_iter"])


def test_batch_size_option_sets_the_images_per_step(monkeypatch, tiny_overrides):
    import lgd_cli.engine.benchmark as bench

    seen = {}
    monkeypatch.setattr(bench, "run_benchmark", lambda cfg, **kwargs: seen.setdefault("cfg", cfg))
    monkeypatch.setattr("lgd_cli.render.benchmark", lambda *args: None)
    # (named options come before --set pairs, which win: leave the fixture's batch size out)
    sets = [x for pair in tiny_overrides if not pair.startswith("SOLVER.IMS_PER_BATCH") for x in ("--set", pair)]
    assert run_cli("benchmark", "--batch-size", "3", "--device", "cpu", *sets,
                       "--set", "SOLVER.AMP.ENABLED=True") == 0
    assert seen["cfg"].SOLVER.IMS_PER_BATCH == 3 and bench.precision_name(seen["cfg"]) == "bfloat16"
