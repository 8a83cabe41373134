"""lgd's label-guided variants (MODEL.DISTILLATOR.TEACHER.HEAD_GRADIENT, DISTILL_GATE) reach the computation,
and every paper preset keeps the published method."""
import pytest
import torch
from detectron2.utils.events import EventStorage

from lgd_cli.config.build import build_config
from lgd_cli.config.presets import list_presets
from lgd_cli.errors import ConfigError
from tests.helpers import losses_of, make_batch

HEAD_OFF = "MODEL.DISTILLATOR.TEACHER.HEAD_GRADIENT=False"
GATE = "MODEL.DISTILLATOR.DISTILL_GATE=teacher_better"


def teacher_terms(losses):
    return sum(v for k, v in losses.items() if k.endswith(".tea"))


def head_grad(model):
    return sum(p.grad.abs().sum() for p in model.student.head.parameters() if p.grad is not None)


@pytest.mark.parametrize("head_gradient", [True, False])
def test_head_gradient_switch_decides_whether_teacher_losses_train_the_head(model_factory, head_gradient):
    model = model_factory(f"MODEL.DISTILLATOR.TEACHER.HEAD_GRADIENT={head_gradient}")
    teacher_terms(losses_of(model, make_batch())).backward()
    assert bool(head_grad(model) > 0) is head_gradient
    # The teacher learns from its detection losses either way, through the head's input.
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.teacher.parameters())
    # And the head's parameters are trainable again after the teacher pass.
    assert all(p.requires_grad for p in model.student.head.parameters())


def test_head_gradient_off_changes_no_loss_value_and_keeps_student_head_gradients(model_factory):
    on, off = model_factory(), model_factory(HEAD_OFF)
    off.load_state_dict(on.state_dict())
    batch = make_batch()
    a, b = losses_of(on, batch), losses_of(off, batch)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    (b["loss_cls"] + b["loss_box_reg"]).backward()
    assert head_grad(off) > 0


def test_head_gradient_off_with_detached_appearance_leaves_the_student_to_its_own_losses(model_factory):
    model = model_factory(HEAD_OFF, "MODEL.DISTILLATOR.TEACHER.DETACH_APPEARANCE_EMBED=True")
    teacher_terms(losses_of(model, make_batch())).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.student.parameters())


@pytest.mark.parametrize("teacher_scale, passes", [(1000.0, False), (0.0, True)])
def test_teacher_better_gate_passes_distillation_only_when_the_teacher_detects_better(
        model_factory, monkeypatch, teacher_scale, passes):
    always, gated = model_factory(), model_factory(GATE)
    gated.load_state_dict(always.state_dict())
    batch = make_batch()
    ungated = losses_of(always, batch)["loss_distill"]
    # Scale what the teacher pass (the second head + loss call of the step) reports: far worse
    # than the student, or perfect.
    calls, losses = [], gated.seams.losses

    def scaled_teacher_pass(*args):
        out = losses(*args)
        calls.append(1)
        return {k: v * teacher_scale for k, v in out.items()} if len(calls) == 2 else out

    monkeypatch.setattr(gated.seams, "losses", scaled_teacher_pass)
    with EventStorage(0) as storage:
        distill = gated(batch)["loss_distill"]
        logged = storage.latest()["distill_gate"][0]
    assert logged == float(passes)
    torch.testing.assert_close(distill, ungated * float(passes))


def test_unknown_gate_is_a_config_error():
    with pytest.raises(ConfigError, match="DISTILL_GATE"):
        build_config("demo", ["MODEL.DISTILLATOR.DISTILL_GATE=sometimes"], device="cpu", resolve_dataset=False)


@pytest.mark.parametrize("preset", [p.name for p in list_presets() if not p.name.endswith("-safe")])
def test_presets_other_than_safe_ones_keep_the_published_method(preset):
    d = build_config(preset, device="cpu", resolve_dataset=False).MODEL.DISTILLATOR
    assert d.TEACHER.HEAD_GRADIENT is True and d.DISTILL_GATE == "always"
