"""LGDDistiller on detectron2's RetinaNet: loss terms, empty batches, detaching, student-only inference."""
import pytest
import torch

from tests.helpers import losses_of, make_batch, two_loss_calls


def test_training_returns_student_teacher_and_distillation_terms(model_factory):
    losses = losses_of(model_factory(), make_batch())
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_cls.tea", "loss_box_reg.tea", "loss_distill"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    assert losses["loss_distill"] > 0


@pytest.mark.parametrize("context", [True, False])
def test_all_empty_batch_trains_with_zero_teacher_and_distillation(model_factory, context):
    model = model_factory(f"MODEL.DISTILLATOR.TEACHER.ADD_CONTEXT_BOX={context}")
    losses = losses_of(model, make_batch(boxes_per_image=0))
    assert losses["loss_distill"] == 0 and losses["loss_cls.tea"] == 0 and losses["loss_box_reg.tea"] == 0
    sum(losses.values()).backward()
    # Every parameter is still in the graph (DDP needs it), with finite gradients.
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_teacher_parameters_learn_from_teacher_losses_only_not_distillation(model_factory):
    model = model_factory()
    losses = losses_of(model, make_batch())
    losses["loss_distill"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.distill_loss.parameters())


@pytest.mark.parametrize("active", [False, True])
def test_student_features_detached_in_distillation_while_inactive(model_factory, active):
    model = model_factory()
    model.distill_active = active
    losses = losses_of(model, make_batch())
    losses["loss_distill"].backward()
    fpn_grad = sum(p.grad.abs().sum() for p in model.student.backbone.parameters() if p.grad is not None)
    assert bool(fpn_grad > 0) is active


def test_detach_appearance_embed_keeps_teacher_losses_out_of_the_student(model_factory):
    model = model_factory("MODEL.DISTILLATOR.TEACHER.DETACH_APPEARANCE_EMBED=True")
    losses = losses_of(model, make_batch())
    (losses["loss_cls.tea"] + losses["loss_box_reg.tea"]).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.student.backbone.parameters())
    # ... while the student's own head is shared and does learn from them.
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.head.parameters())


def test_per_step_teacher_pass_leaves_the_loss_normaliser_as_one_pass_would(model_factory):
    lgd = model_factory("MODEL.DISTILLATOR.TEACHER.LOSS_NORMALIZER=per_step")
    base = model_factory("MODEL.DISTILLATOR.ENABLED=False")
    base.load_state_dict(lgd.state_dict(), strict=False)
    batch = make_batch()
    a, b = losses_of(lgd, batch), losses_of(base, batch)
    torch.testing.assert_close(a["loss_cls"], b["loss_cls"])
    assert lgd.student.loss_normalizer == pytest.approx(base.student.loss_normalizer)


def test_reference_loss_normaliser_advances_once_per_loss_call(model_factory):
    """Two loss calls in one step, by hand: RetinaNet's EMA starts at 100 with momentum 0.9."""
    batch = make_batch()
    targets, student, after_student, teacher, after_teacher = two_loss_calls(model_factory(), batch)
    labels = torch.stack(targets.gt_labels)
    positives = int(((labels >= 0) & (labels != 3)).sum())
    assert positives > 0
    assert after_student == pytest.approx(0.9 * 100 + 0.1 * positives)
    assert after_teacher == pytest.approx(0.81 * 100 + 0.19 * positives)
    # Both terms are sums divided by the normaliser the call has just updated.
    for key in student:
        torch.testing.assert_close(teacher[key], student[key] * after_student / after_teacher)

    # Through a whole training step, against one pass of the plain student on the same batch.
    lgd, base = model_factory(), model_factory("MODEL.DISTILLATOR.ENABLED=False")
    base.load_state_dict(lgd.state_dict(), strict=False)
    losses_of(lgd, batch), losses_of(base, batch)
    one_update = base.student.loss_normalizer  # 90 + 0.1 p
    assert lgd.student.loss_normalizer == pytest.approx(0.9 * one_update + (one_update - 90))


def test_each_option_key_reaches_its_computation(model_factory, monkeypatch):
    from lgd_cli.modeling import distiller
    from lgd_cli.modeling.lgd import teacher

    packed, scales = [], []
    pack, masks = distiller.pack_objects, teacher.box_cell_masks
    monkeypatch.setattr(distiller, "pack_objects", lambda *a, **k: packed.append(pack(*a, **k)) or packed[-1])
    monkeypatch.setattr(teacher, "box_cell_masks", lambda *a: scales.append(a[4]) or masks(*a))
    batch = make_batch() + make_batch(num_images=1, boxes_per_image=0)  # 64 px: p7 is 1 x 1
    official = model_factory()
    lgd = model_factory("MODEL.DISTILLATOR.LABEL_ENCODER.BOX_CLAMP=image",
                        "MODEL.DISTILLATOR.LABEL_ENCODER.EMPTY_IMAGE=context",
                        "MODEL.DISTILLATOR.TEACHER.CELL_MAPPING=stride")
    for model in (official, lgd):
        losses_of(model, batch)
    (ref_objects, lgd_objects), (ref_scales, lgd_scales) = packed, scales
    # BOX_CLAMP: the context box of the 64 x 64 canvas.
    assert ref_objects.boxes[0, -1].tolist() == [0.0, 0.0, 63.0, 63.0]
    assert lgd_objects.boxes[0, -1].tolist() == [0.0, 0.0, 64.0, 64.0]
    # EMPTY_IMAGE: image 2 has no box.
    assert ref_objects.is_pseudo[2].any() and not lgd_objects.is_pseudo.any()
    # CELL_MAPPING: p7 (stride 128) of a 64-px canvas is one cell: 1/64 against 1/128.
    assert ref_scales[-1] == (1 / 64, 1 / 64) and lgd_scales[-1] == (1 / 128, 1 / 128)


def test_baseline_has_no_lgd_modules(model_factory):
    model = model_factory("MODEL.DISTILLATOR.ENABLED=False")
    assert model.teacher is None and model.distill_loss is None
    assert set(losses_of(model, make_batch())) == {"loss_cls", "loss_box_reg"}


def test_inference_runs_the_student_alone(model_factory):
    model = model_factory().eval()
    called = []
    model.teacher.register_forward_hook(lambda *a: called.append(1))
    with torch.no_grad():
        out = model([{"image": torch.zeros(3, 64, 64), "height": 128, "width": 128}])
    assert not called and out[0]["instances"].image_size == (128, 128)
    model.evaluate_teacher = True
    with torch.no_grad():
        out = model(make_batch(num_images=1))
    assert called and "instances" in out[0]


def test_config_keys_reach_their_modules(model_factory):
    """MODEL.DISTILLATOR.LAMBDA, TEACHER.INTERACT_PATTERN / NR_TRANSFORMER_HEADS and
    LABEL_ENCODER.CATEGORY_FORMAT, changed from their defaults, are what the built modules use."""
    default = model_factory()
    assert default.distill_loss.loss_weight == 1.0 and default.teacher.relation.pattern == "stuGuided"
    assert default.teacher.relation.attention.num_heads == 8
    assert default.teacher.label_encoder.in_dim == 4 + 3  # box + one-hot over K = 3
    changed = model_factory("MODEL.DISTILLATOR.LAMBDA=2.5", "MODEL.DISTILLATOR.TEACHER.INTERACT_PATTERN=labelGuided",
                            "MODEL.DISTILLATOR.TEACHER.NR_TRANSFORMER_HEADS=4",
                            "MODEL.DISTILLATOR.LABEL_ENCODER.CATEGORY_FORMAT=norm_classes")
    assert changed.distill_loss.loss_weight == 2.5
    assert changed.teacher.relation.pattern == "labelGuided"
    assert changed.teacher.relation.attention.num_heads == 4
    assert changed.teacher.label_encoder.category_format == "norm_classes"
    assert changed.teacher.label_encoder.in_dim == 4 + 1  # box + class / K
    # A pattern without attention builds none (student_fill passes the appearance through).
    assert not hasattr(model_factory("MODEL.DISTILLATOR.TEACHER.INTERACT_PATTERN=student_fill").teacher.relation,
                       "attention")


def test_lambda_scales_the_distillation_loss(model_factory):
    batch = make_batch()
    base = losses_of(model_factory(), batch)
    scaled = losses_of(model_factory("MODEL.DISTILLATOR.LAMBDA=2.5"), batch)  # the same initial weights
    assert scaled["loss_distill"].item() == pytest.approx(2.5 * base["loss_distill"].item(), rel=1e-5)
    assert scaled["loss_cls"].item() == pytest.approx(base["loss_cls"].item(), rel=1e-6)  # and nothing else


def test_interact_pattern_and_heads_change_the_teacher_maps(model_factory):
    """Not only stored: a different pattern, head count or class format gives other teacher maps, hence
    another loss (the same computation on the CPU gives the same float: far below 1e-6 apart)."""
    batch = make_batch()
    base = losses_of(model_factory(), batch)["loss_distill"].item()
    for changed in ("MODEL.DISTILLATOR.TEACHER.INTERACT_PATTERN=teacher_fill",
                    "MODEL.DISTILLATOR.TEACHER.NR_TRANSFORMER_HEADS=4",
                    "MODEL.DISTILLATOR.LABEL_ENCODER.CATEGORY_FORMAT=norm_classes"):
        assert losses_of(model_factory(changed), batch)["loss_distill"].item() != pytest.approx(base, rel=1e-6), changed
