"""build_config: one builder for presets, YAML files and checkpoints' saved configs; typed --set errors; devices."""
import pytest
import torch
from detectron2.config import get_cfg

from lgd_cli.config import choices
from lgd_cli.config.build import SavedConfig, base_config, build_config
from lgd_cli.config.defaults import IGNORED_SOLVER_KEYS
from lgd_cli.errors import ConfigError
from tests.helpers import run_cli

SCHEDULE = ["LGD.RELATIVE_SCHEDULE.POST_NONDISTILL=0.1", "LGD.RELATIVE_SCHEDULE.PRE_FREEZE_BACKBONE=0.2"]


def _demo(*overrides):
    return build_config("demo", list(overrides), device="cpu", resolve_dataset=False)


def _windows(cfg):
    d = cfg.MODEL.DISTILLATOR
    return {"pre": d.PRE_NONDISTILL_ITERS, "post": d.POST_NONDISTILL_ITERS,
            "freeze": d.PRE_FREEZE_STUDENT_BACKBONE_ITERS,
            **{f"{b.lower()}_steps": tuple(d[b].SOLVER.STEPS) for b in ("STUDENT", "TEACHER")},
            **{f"{b.lower()}_warmup": d[b].SOLVER.WARMUP_ITERS for b in ("STUDENT", "TEACHER")}}


def test_max_iter_on_a_preset_scales_every_window_steps_and_warmup():
    # demo: PRE 0.1667, STEPS (0.6667, 0.8889), WARMUP 0.0333 of MAX_ITER.
    cfg = _demo(*SCHEDULE, "SOLVER.MAX_ITER=1000")
    assert _windows(cfg) == {"pre": 167, "post": 100, "freeze": 200, "student_steps": (667, 889),
                             "teacher_steps": (667, 889), "student_warmup": 33, "teacher_warmup": 33}
    assert _windows(_demo(*SCHEDULE, "SOLVER.MAX_ITER=3000"))["student_steps"] == (2000, 2667)


def test_an_explicit_derived_key_wins_over_its_fraction():
    cfg = _demo("MODEL.DISTILLATOR.PRE_NONDISTILL_ITERS=5", "SOLVER.MAX_ITER=1000",
                "MODEL.DISTILLATOR.TEACHER.SOLVER.STEPS=(300,)")
    assert cfg.MODEL.DISTILLATOR.PRE_NONDISTILL_ITERS == 5
    assert tuple(cfg.MODEL.DISTILLATOR.TEACHER.SOLVER.STEPS) == (300,)
    assert tuple(cfg.MODEL.DISTILLATOR.STUDENT.SOLVER.STEPS) == (667, 889)


def test_a_saved_config_keeps_its_iteration_keys_unless_max_iter_changes():
    trained = _demo(*SCHEDULE, "SOLVER.MAX_ITER=1000", "MODEL.DISTILLATOR.PRE_NONDISTILL_ITERS=7")
    saved = SavedConfig.of(trained)
    kept = build_config(saved, ["MODEL.DISTILLATOR.LAMBDA=2", "SOLVER.MAX_ITER=1000"], device="cpu")
    assert _windows(kept) == _windows(trained) and kept.MODEL.DISTILLATOR.LAMBDA == 2.0
    rescaled = build_config(saved, ["SOLVER.MAX_ITER=3000", "MODEL.DISTILLATOR.STUDENT.SOLVER.WARMUP_ITERS=11"],
                            device="cpu")
    assert _windows(rescaled) == {"pre": 500, "post": 300, "freeze": 600, "student_steps": (2000, 2667),
                                  "teacher_steps": (2000, 2667), "student_warmup": 11, "teacher_warmup": 100}


def test_a_saved_config_is_checked_like_a_preset():
    saved = SavedConfig.of(_demo(), origin="model_final.pth")
    with pytest.raises(ConfigError, match="LAMBDA must be a finite number >= 0"):
        build_config(saved, ["MODEL.DISTILLATOR.LAMBDA=-1"], device="cpu")
    with pytest.raises(ConfigError, match="SOLVER.BASE_LR is not read"):
        build_config(saved, ["SOLVER.BASE_LR=0.1"], device="cpu")


@pytest.mark.parametrize("pair, message", [
    ("LGD.LOG_PERIOD=0", "LGD.LOG_PERIOD must be 1 or more, got 0"),
    ("LGD.SKIP_NONFINITE=-1", "must be 0 or more, got -1"),
])
def test_a_count_out_of_range_is_refused_when_the_config_is_built(pair, message):
    with pytest.raises(ConfigError, match=message):
        build_config("demo", [pair], device="cpu")


def test_lgd_eval_refuses_a_bad_override_of_the_checkpoints_config(monkeypatch, tmp_path):
    from lgd_cli.engine import evaluate

    text = _demo().dump()
    monkeypatch.setattr(evaluate, "read_lgd_checkpoint", lambda path: {"lgd": {"config": text}, "model": {}})
    with pytest.raises(ConfigError, match="LAMBDA must be a finite number >= 0, got -1"):
        evaluate.evaluate_checkpoint(tmp_path / "model_final.pth", overrides=["MODEL.DISTILLATOR.LAMBDA=-1"],
                                     output=tmp_path / "eval", device="cpu")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("pair, message", [
    ("MODEL.DISTILLATOR.LAMBDA=abc", "MODEL.DISTILLATOR.LAMBDA expects a number, got 'abc'"),
    ("SOLVER.MAX_ITER=1.5", "SOLVER.MAX_ITER expects an integer, got '1.5'"),
    ("MODEL.DISTILLATOR.ENABLED=yes", "MODEL.DISTILLATOR.ENABLED expects True or False, got 'yes'"),
    ("INPUT.MIN_SIZE_TRAIN=128", "INPUT.MIN_SIZE_TRAIN expects a list, got '128'"),
    ("MODEL.WEIGHTS=12", "MODEL.WEIGHTS expects a string, got '12'"),
])
def test_a_value_of_the_wrong_type_names_the_type_the_key_takes(pair, message):
    with pytest.raises(ConfigError) as info:
        _demo(pair)
    assert info.value.message == message and "Type mismatch" not in (info.value.hint or "")


def test_an_integer_is_a_number_and_a_quoted_number_a_string():
    cfg = _demo("MODEL.DISTILLATOR.LAMBDA=2", "MODEL.WEIGHTS='12'")
    assert cfg.MODEL.DISTILLATOR.LAMBDA == 2.0 and isinstance(cfg.MODEL.DISTILLATOR.LAMBDA, float)
    assert cfg.MODEL.WEIGHTS == "12"


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CUDA", "cuda:"])
def test_an_unknown_device_is_refused(device):
    with pytest.raises(ConfigError) as info:
        build_config("demo", device=device, resolve_dataset=False)
    assert info.value.message == f"unknown device '{device}'" and info.value.hint == "cpu, cuda or cuda:N"


def test_a_cuda_index_beyond_the_visible_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert build_config("demo", device="cuda:1", resolve_dataset=False).MODEL.DEVICE == "cuda:1"
    with pytest.raises(ConfigError, match="--device cuda:2 asked for, but only 2 CUDA devices are visible"):
        build_config("demo", device="cuda:2", resolve_dataset=False)


def test_a_bad_device_stops_lgd_train_before_anything_is_written(tmp_path, capsys):
    assert run_cli("train", "--device", "gpu", "--output", str(tmp_path / "run")) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_every_choice_key_exists_and_its_default_is_accepted():
    cfg = base_config()
    for key, choice in choices.CHOICES.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        allowed = {v.lower() for v in choice.values} if choice.any_case else set(choice.values)
        assert (node.lower() if choice.any_case else node) in allowed, key
        assert set(choice.shown) <= set(choice.values), key


@pytest.mark.parametrize("key, value, message", [
    ("MODEL.DISTILLATOR.LABEL_ENCODER.CATEGORY_FORMAT", "ids", "must be one_hot or norm_classes, not 'ids'"),
    ("MODEL.DISTILLATOR.TEACHER.SOLVER.OPTIMIZER", "Adam", "must be SGD or AdamW, not 'Adam'"),
    ("MODEL.DISTILLATOR.STUDENT.SOLVER.LR_SCHEDULER_NAME", "StepLR",
     "must be WarmupMultiStepLR or WarmupCosineLR, not 'StepLR'"),
    ("LGD.DATA.BAD_BOXES", "fix", "--bad-boxes (LGD.DATA.BAD_BOXES) must be clip, drop or error, not 'fix'"),
])
def test_a_value_outside_a_keys_choices_is_refused(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _demo(f"{key}={value}")
    _demo("MODEL.DISTILLATOR.TEACHER.SOLVER.OPTIMIZER=adamw", "SOLVER.AMP.DTYPE=BF16")  # any case where the key says so


def test_the_modules_that_read_a_choice_key_share_its_values():
    from lgd_cli.data.validate import BAD_BOX_POLICIES
    from lgd_cli.engine.amp import DTYPES
    from lgd_cli.modeling import distiller
    from lgd_cli.modeling.lgd import BOX_CLAMPS, CELL_MAPPINGS, EMPTY_IMAGE_RULES, label_encoder, relation_adapter
    from lgd_cli.modeling.students.dense import LOSS_NORMALIZER_RULES

    assert distiller.DISTILL_GATES is choices.DISTILL_GATES and BAD_BOX_POLICIES is choices.BAD_BOX_POLICIES
    assert (BOX_CLAMPS, EMPTY_IMAGE_RULES, CELL_MAPPINGS, LOSS_NORMALIZER_RULES) == (
        choices.BOX_CLAMPS, choices.EMPTY_IMAGE_RULES, choices.CELL_MAPPINGS, choices.LOSS_NORMALIZER_RULES)
    assert label_encoder.CATEGORY_FORMATS is choices.CATEGORY_FORMATS
    assert relation_adapter.INTERACT_PATTERNS is choices.INTERACT_PATTERNS
    assert set(DTYPES) == set(choices.AMP_DTYPES) and DTYPES["bf16"] is torch.bfloat16


def test_the_ignored_solver_keys_are_detectron2_keys_each_block_replaces():
    block, solver = base_config().MODEL.DISTILLATOR.STUDENT.SOLVER, get_cfg().SOLVER
    assert all(key in solver for key in IGNORED_SOLVER_KEYS)
    assert set(IGNORED_SOLVER_KEYS) - set(block) == {"NESTEROV"}  # never Nesterov: no block key either
