"""`lgd benchmark` measures both arms and writes every key with sane values, and says when its times are unreliable."""
import pytest
import torch

from lgd_cli.engine import benchmark as bench
from lgd_cli.engine.benchmark import StepTimes, run_benchmark, timing_warnings
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
    for arm in ("baseline", "lgd"):
        t = result["train"]
        assert 0 < t[f"{arm}_s_per_iter_min"] <= t[f"{arm}_s_per_iter"] <= t[f"{arm}_s_per_iter_max"], arm
    assert isinstance(result["warnings"], list) and all(isinstance(w, str) for w in result["warnings"])


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


def test_arms_differ_only_in_distillation_and_are_built_by_build_config(tiny_cfg):
    baseline, lgd = bench._arm_config(tiny_cfg, False), bench._arm_config(tiny_cfg, True)
    assert baseline.MODEL.DISTILLATOR.ENABLED is False and lgd.MODEL.DISTILLATOR.ENABLED is True
    assert baseline.is_frozen() and lgd.MODEL.DEVICE == tiny_cfg.MODEL.DEVICE
    same = baseline.clone()
    same.defrost()
    same.MODEL.DISTILLATOR.ENABLED = True
    assert same.dump() == lgd.dump() == bench._arm_config(lgd, True).dump()


def test_the_lgd_arm_times_distilling_steps_that_train_the_backbone(monkeypatch, tiny_overrides):
    # A schedule whose windows cover every step the benchmark takes, had its hooks been installed.
    cfg = build_config("demo", tiny_overrides + ["LGD.RELATIVE_SCHEDULE.ENABLED=False", "SOLVER.MAX_ITER=1000",
                                                 "MODEL.DISTILLATOR.PRE_NONDISTILL_ITERS=1000",
                                                 "MODEL.DISTILLATOR.PRE_FREEZE_STUDENT_BACKBONE_ITERS=1000"], device="cpu")
    built, detached = [], []
    real_build, real_trainer = bench.build_distiller, bench.LGDTrainer

    def build(arm_cfg):
        model = real_build(arm_cfg)
        model.distill_active = False  # as LGDScheduleHook leaves it inside the PRE window
        loss = model.distill_loss.forward
        model.distill_loss.forward = lambda *a, detach_student, **k: (detached.append(detach_student),
                                                                       loss(*a, detach_student=detach_student, **k))[1]
        built.append(model)
        return model

    class FrozenTrainer(real_trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.freeze_backbone = True  # as the hook leaves it inside the freeze window

    monkeypatch.setattr(bench, "build_distiller", build)
    monkeypatch.setattr(bench, "LGDTrainer", FrozenTrainer)
    result = bench._measure_arm(cfg, True, iters=2, warmup=1, profile=False, inference=False)
    assert result["s_per_iter"] > 0
    # Every step (warm-up, timed, FLOP-counted) computed loss_distill into the student's features...
    assert detached == [False] * 4
    # ...and updated the bottom-up backbone (gradients dropped while frozen).
    assert all(p.grad is not None for p in built[0].frozen_backbone_parameters())


TIGHT_BASE, TIGHT_LGD = StepTimes(0.100, 0.105, 0.110), StepTimes(0.200, 0.210, 0.220)


def test_no_warning_for_tight_separated_times_on_a_quiet_machine():
    assert timing_warnings(TIGHT_BASE, TIGHT_LGD, load=(0.4, 4)) == []
    assert timing_warnings(TIGHT_BASE, TIGHT_LGD, load=None) == []


def test_a_wide_spread_is_a_warning_naming_the_arm():
    (warning,) = timing_warnings(TIGHT_BASE, StepTimes(0.150, 0.210, 0.240))
    assert warning.startswith("LGD step times vary 1.6x (min 0.1500 s, max 0.2400 s)")
    assert timing_warnings(StepTimes(0.1, 0.1, 0.15), TIGHT_LGD) == []  # 1.5x exactly: still fine


def test_overlapping_arms_are_a_warning():
    (warning,) = timing_warnings(StepTimes(0.100, 0.120, 0.140), StepTimes(0.110, 0.130, 0.150))
    assert warning.startswith("the arms' step times overlap (baseline 0.1000-0.1400 s, LGD 0.1100-0.1500 s)")
    # Ranges that touch only at their tails, each median outside the other's range: no warning.
    assert timing_warnings(StepTimes(0.100, 0.110, 0.135), StepTimes(0.130, 0.140, 0.150)) == []


def test_a_busy_machine_is_a_warning():
    (warning,) = timing_warnings(TIGHT_BASE, TIGHT_LGD, load=(3.0, 4))
    assert "load average 3.0 on 4 CPUs" in warning
    assert timing_warnings(TIGHT_BASE, TIGHT_LGD, load=(2.0, 4)) == []


def test_the_table_shows_the_spread_and_the_warnings(capsys):
    from lgd_cli import render

    train = {"baseline_s_per_iter": 0.105, "lgd_s_per_iter": 0.21, "lgd_over_baseline": 2.0,
             "baseline_s_per_iter_min": 0.1, "baseline_s_per_iter_max": 0.11,
             "lgd_s_per_iter_min": 0.2, "lgd_s_per_iter_max": 0.5,
             "baseline_images_per_s": 19.0, "lgd_images_per_s": 9.5}
    result = {"preset": "demo", "device": "cpu", "batch": 2, "precision": "fp32", "iters": 3, "train": train,
              "flops": {"baseline_train_gflops": 1.0, "lgd_train_gflops": 1.5, "lgd_over_baseline": 1.5},
              "memory": {"baseline_peak_mb": 100.0, "lgd_peak_mb": 150.0, "lgd_over_baseline": 1.5},
              "params": {"student": 10, "lgd_only": 2}, "inference": {"eager_ms_per_image": 3.0},
              "warnings": timing_warnings(StepTimes(0.1, 0.105, 0.11), StepTimes(0.2, 0.21, 0.5))}
    render.benchmark(result)
    out = capsys.readouterr().out
    assert "0.100-0.110" in out and "0.200-0.500" in out
    assert "warning: LGD step times vary 2.5x" in " ".join(out.split())


def test_peak_memory_is_one_helper_for_the_benchmark_and_compare():
    from lgd_cli.engine.resources import peak_memory_mb

    assert peak_memory_mb("cpu") == pytest.approx(peak_memory_mb(torch.device("cpu")), rel=0.1)
    assert peak_memory_mb("cpu") > 10  # a Python process with torch loaded holds more than 10 MB
