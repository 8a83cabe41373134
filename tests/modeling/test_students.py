"""LGD on the FCOS, Faster R-CNN and Mask R-CNN students: loss terms, shared targets, empty batches, label maps."""
import pytest
import torch
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from lgd_cli.config.build import build_config
from lgd_cli.errors import ConfigError
from lgd_cli.modeling.lgd import box_cell_masks, level_scales
from lgd_cli.modeling.students.fcos import FCOS
from lgd_cli.modeling.students.rcnn import label_map_cells

from tests import helpers
from tests.helpers import STUDENT_OVERRIDES as DETECTORS, losses_of, two_loss_calls

# pycocotools (rasterising polygons) on numpy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

STUDENT_TERMS = {
    "fcos": {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"},
    "faster": {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"},
    "mask": {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc", "loss_mask"},
}
# The switch values the reference does not use for a detector: both must work everywhere.
OTHER_SWITCHES = {
    "fcos": ["MODEL.DISTILLATOR.TEACHER.ADD_CONTEXT_BOX=False", "MODEL.DISTILLATOR.TEACHER.DETACH_APPEARANCE_EMBED=True"],
    "faster": ["MODEL.DISTILLATOR.TEACHER.ADD_CONTEXT_BOX=True", "MODEL.DISTILLATOR.TEACHER.DETACH_APPEARANCE_EMBED=False"],
    "mask": ["MODEL.DISTILLATOR.TEACHER.ADD_CONTEXT_BOX=True", "MODEL.DISTILLATOR.TEACHER.DETACH_APPEARANCE_EMBED=False"],
}


def make_batch(num_images=2, boxes_per_image=2, size=64, seed=0, bitmasks=False):
    """Random boxes, each with a diamond-shaped polygon mask inscribed in it (or its bitmask)."""
    return helpers.make_batch(num_images, boxes_per_image, size, seed, min_side=8,
                              masks="bitmask" if bitmasks else "polygon")


def targets_positives(targets) -> int:
    labels = torch.stack(targets.gt_labels)
    return max(int(((labels >= 0) & (labels != 3)).sum()), 1)


@pytest.mark.parametrize("detector", list(DETECTORS))
def test_lgd_iterations_give_all_terms_and_train_teacher_and_student(build, detector):
    model = build(detector)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(2):
        optimizer.zero_grad()
        losses = losses_of(model, make_batch(seed=step))
        tea = {f"{k}.tea" for k in STUDENT_TERMS[detector]}
        assert set(losses) == STUDENT_TERMS[detector] | tea | {"loss_distill"}
        assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values()), losses
        assert losses["loss_distill"] > 0
        sum(losses.values()).backward()
        for group in (model.teacher, model.student.backbone.bottom_up, model.distill_loss):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in group.parameters())
        # Every parameter takes part (DDP without find_unused_parameters).
        assert not [name for name, p in model.named_parameters() if p.grad is None]
        optimizer.step()


@pytest.mark.parametrize("detector", list(DETECTORS))
def test_teacher_pass_on_the_student_maps_reproduces_the_student_losses(build, detector):
    """Targets are shared: the same maps through the second pass give the same losses (and EMA state)."""
    model = build(detector, "MODEL.DISTILLATOR.TEACHER.LOSS_NORMALIZER=per_step")
    seams = model.seams
    batch = make_batch()
    gt = [x["instances"] for x in batch]
    with EventStorage(0):
        images, maps = seams.extract(batch)
        targets = seams.new_targets()
        before = getattr(model.student, "loss_normalizer", None)
        seams.losses(images, maps, gt, targets)  # fills the targets (the RPN samples its anchors here)
        assert targets.anchors is not None
        torch.manual_seed(1)  # the ROI heads sample proposals at random in each pass
        first = seams.losses(images, maps, gt, targets)
        after_first = getattr(model.student, "loss_normalizer", None)
        torch.manual_seed(1)
        second = seams.losses(images, maps, gt, targets)
    assert set(first) == set(second) == STUDENT_TERMS[detector]
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
    # FCOS's loss-normaliser EMA is rewound for each later pass: one update per batch.
    assert getattr(model.student, "loss_normalizer", None) == after_first
    if detector == "fcos":
        assert before is None and after_first == pytest.approx(0.9 * 300 + 0.1 * targets_positives(targets))


def test_reference_fcos_loss_normaliser_advances_with_each_pass(build):
    """The official rule: each loss call updates the EMA (from 300, momentum 0.9), so the teacher
    pass on the same maps normalises by the second update."""
    model = build("fcos")
    targets, first, n1, second, n2 = two_loss_calls(model, make_batch())
    p = targets_positives(targets)
    assert n1 == pytest.approx(0.9 * 300 + 0.1 * p) and n2 == pytest.approx(0.81 * 300 + 0.19 * p)
    for key in first:
        torch.testing.assert_close(second[key], first[key] * n1 / n2)


@pytest.mark.parametrize("detector", list(DETECTORS))
def test_baseline_trains_the_plain_student(build, detector):
    model = build(detector, "MODEL.DISTILLATOR.ENABLED=False")
    assert model.teacher is None and model.distill_loss is None
    assert set(losses_of(model, make_batch())) == STUDENT_TERMS[detector]


@pytest.mark.parametrize("detector", list(DETECTORS))
def test_all_empty_batch_gives_zero_teacher_and_distillation(build, detector):
    extra = ["MODEL.DISTILLATOR.LABEL_ENCODER.LOAD_LABELMAP=True"] if detector == "mask" else []
    model = build(detector, *OTHER_SWITCHES[detector], *extra)
    losses = losses_of(model, make_batch(boxes_per_image=0))
    teacher_terms = [k for k in losses if k.endswith(".tea")] + ["loss_distill"]
    assert all(losses[k] == 0 for k in teacher_terms), losses
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("detector", list(DETECTORS))
def test_evaluate_teacher_detects_from_the_teacher_maps(build, detector):
    extra = ["MODEL.DISTILLATOR.LABEL_ENCODER.LOAD_LABELMAP=True"] if detector == "mask" else []
    model = build(detector, *extra, eval_mode=True)
    model.evaluate_teacher = True
    called = []
    model.teacher.register_forward_hook(lambda *a: called.append(1))
    batch = make_batch()
    batch[0].update(height=128, width=128)
    with torch.no_grad():
        out = model(batch)
    assert called and len(out) == 2
    instances = out[0]["instances"]
    assert isinstance(instances, Instances) and instances.image_size == (128, 128)
    assert instances.has("pred_boxes") and instances.has("scores")
    assert instances.has("pred_masks") is (detector == "mask")


@pytest.mark.parametrize("bitmasks", [False, True])
def test_label_maps_put_mask_crops_in_the_descriptor_and_train(build, bitmasks):
    model = build("mask", "MODEL.DISTILLATOR.LABEL_ENCODER.LOAD_LABELMAP=True")
    assert model.label_maps and model.teacher.label_encoder.in_dim == 4 + 3 + 49
    # One image without objects (and so without gt_masks) beside one with.
    batch = make_batch(num_images=1, bitmasks=bitmasks) + make_batch(num_images=1, boxes_per_image=0, seed=1)
    losses = losses_of(model, batch)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_distill"] > 0
    sum(losses.values()).backward()
    assert any(p.grad.abs().sum() > 0 for p in model.teacher.label_encoder.parameters())


def test_label_maps_need_masks(build):
    with pytest.raises(ConfigError, match="MASK_ON"):
        build("faster", "MODEL.DISTILLATOR.LABEL_ENCODER.LOAD_LABELMAP=True")


@pytest.mark.parametrize("mapping", ["reference", "stride"])
@pytest.mark.parametrize("bitmasks", [False, True])
def test_label_map_cells_of_a_rectangle_match_its_box_cells(bitmasks, mapping):
    size, strides = 64, [4, 8, 16, 32, 64]
    shapes = [(size // s, size // s) for s in strides]
    box = [5.0, 9.0, 43.0, 30.0]  # no side on a cell point of any level
    x0, y0, x1, y1 = box
    inst = Instances((size, size), gt_boxes=Boxes(torch.tensor([box])), gt_classes=torch.tensor([0]))
    masks = PolygonMasks([[[x0, y0, x1, y0, x1, y1, x0, y1]]])
    inst.gt_masks = BitMasks.from_polygon_masks(masks, size, size) if bitmasks else masks
    include, context = torch.tensor([[True, True]]), torch.tensor([[False, True]])
    cells = label_map_cells([inst], include, context, shapes, strides, (size, size), mapping)
    boxes = torch.tensor([[box, [0, 0, size, size]]])
    expected = box_cell_masks(boxes, include, context, shapes, level_scales(shapes, strides, (size, size), mapping))
    for got, want in zip(cells, expected):
        torch.testing.assert_close(got, want)
    assert cells[0][0, 0].sum() > 0 and cells[-1][0, 1].all()


def test_label_map_cells_follow_the_mask_shape():
    size, strides = 64, [4, 8]
    shapes = [(16, 16), (8, 8)]
    triangle = [[[0.0, 0.0, 63.0, 0.0, 0.0, 63.0]]]  # the upper-left half of the image
    inst = Instances((size, size), gt_boxes=Boxes(torch.tensor([[0.0, 0.0, 63.0, 63.0]])), gt_classes=torch.tensor([1]))
    inst.gt_masks = PolygonMasks(triangle)
    for mapping in ("reference", "stride"):
        cells = label_map_cells([inst], torch.tensor([[True]]), torch.tensor([[False]]), shapes, strides,
                                (size, size), mapping)
        fine = cells[0][0, 0]
        assert fine[1, 1] == 1 and fine[14, 14] == 0 and 0.4 < fine.mean() < 0.65
        torch.testing.assert_close(cells[1][0, 0], fine[::2, ::2])


def test_reference_label_map_cells_sample_where_nearest_resizing_reads():
    # Image 80 x 96 on a 96 x 96 canvas. p6 (stride 64) of it is 2 x 2: nearest resizing
    # 96 -> 2 reads rows/columns 0 and 48, the stride rule 0 and 64. p2 (96/4 = 24) agrees.
    size, padded = (80, 96), (96, 96)
    shapes, strides = [(24, 24), (2, 2)], [4, 64]
    bitmask = torch.zeros(2, *size, dtype=torch.bool)
    bitmask[0, 40:60, 40:60] = True  # holds pixel (48, 48), not (64, 64)
    bitmask[1, 60:80, 60:80] = True  # holds (64, 64), not (48, 48)
    inst = Instances(size, gt_boxes=Boxes(torch.tensor([[40.0, 40.0, 60.0, 60.0], [60.0, 60.0, 80.0, 80.0]])),
                     gt_classes=torch.tensor([0, 1]), gt_masks=BitMasks(bitmask))
    include, context = torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2, dtype=torch.bool)
    p2, p6 = label_map_cells([inst], include, context, shapes, strides, padded)
    assert p6[0, 0].nonzero().tolist() == [[1, 1]] and p6[0, 1].sum() == 0
    assert p2[0, 0].nonzero().tolist() == [[i, j] for i in range(10, 15) for j in range(10, 15)]
    # Rows 60..79 exist, 80.. are padding: p2 rows 15..19 only.
    assert p2[0, 1].nonzero()[:, 0].unique().tolist() == list(range(15, 20))
    _, p6_stride = label_map_cells([inst], include, context, shapes, strides, padded, "stride")
    assert p6_stride[0, 0].sum() == 0 and p6_stride[0, 1].nonzero().tolist() == [[1, 1]]


def test_fcos_is_registered_and_reg_weight_scales_the_box_loss(build):
    assert META_ARCH_REGISTRY.get("FCOS") is FCOS
    batch = make_batch()
    one = losses_of(build("fcos", "MODEL.FCOS.REG_WEIGHT=1.0", "MODEL.DISTILLATOR.ENABLED=False"), batch)
    two = losses_of(build("fcos", "MODEL.FCOS.REG_WEIGHT=2.0", "MODEL.DISTILLATOR.ENABLED=False"), batch)
    torch.testing.assert_close(two["loss_fcos_loc"], 2 * one["loss_fcos_loc"])
    torch.testing.assert_close(two["loss_fcos_cls"], one["loss_fcos_cls"])


def test_fcos_reads_its_keys(build):
    model = build("fcos", "MODEL.FCOS.NUM_CONVS=2", "MODEL.FCOS.CENTER_SAMPLING_RADIUS=2.5",
                  "MODEL.FCOS.SCORE_THRESH_TEST=0.3", "MODEL.FCOS.NMS_THRESH_TEST=0.5", "MODEL.FCOS.NORM=GN",
                  "TEST.DETECTIONS_PER_IMAGE=7", "MODEL.FCOS.IN_FEATURES=['p3','p4','p5','p6']",
                  "MODEL.FCOS.FPN_STRIDES=[8,16,32,64]",
                  "MODEL.FCOS.OBJECT_SIZES_OF_INTEREST=[[-1,64],[64,128],[128,256],[256,1e9]]")
    s = model.student
    assert len(s.head.cls_subnet) == 2 * 3  # conv, GroupNorm, ReLU per conv
    assert isinstance(s.head.cls_subnet[1], torch.nn.GroupNorm)
    assert (s.center_sampling_radius, s.test_score_thresh, s.test_nms_thresh, s.max_detections_per_image) == (
        2.5, 0.3, 0.5, 7)
    assert model.strides == [8, 16, 32, 64] and s.num_classes == 3


@pytest.mark.parametrize("override, key", [
    ("MODEL.FCOS.FPN_STRIDES=[4,8,16,32,64]", "MODEL.FCOS.FPN_STRIDES"),
    ("MODEL.FCOS.CENTERNESS_ON_REG=False", "MODEL.FCOS.CENTERNESS_ON_REG"),
    ("MODEL.FCOS.NORM_REG_TARGETS=False", "MODEL.FCOS.NORM_REG_TARGETS"),
    ("MODEL.FCOS.BBOX_REG_WEIGHTS=(10.0,10.0,5.0,5.0)", "MODEL.FCOS.BBOX_REG_WEIGHTS"),
    ("MODEL.FCOS.IOU_LOSS_TYPE=iou", "MODEL.FCOS.IOU_LOSS_TYPE"),
    ("MODEL.FCOS.OBJECT_SIZES_OF_INTEREST=[[-1,32],[32,128],[128,256],[256,512],[512,1e9]]",
     "MODEL.FCOS.OBJECT_SIZES_OF_INTEREST"),
    ("MODEL.FCOS.NORM_SYNC=False", "MODEL.FCOS.NORM_SYNC"),
    ("MODEL.SHIFT_GENERATOR.NUM_SHIFTS=2", "MODEL.SHIFT_GENERATOR.NUM_SHIFTS"),
    ("MODEL.SHIFT_GENERATOR.OFFSET=0.0", "MODEL.SHIFT_GENERATOR.OFFSET"),
    ("MODEL.NMS_TYPE=soft", "MODEL.NMS_TYPE"),
])
def test_fcos_refuses_what_detectron2s_fcos_cannot_do(build, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build("fcos", override)


@pytest.mark.slow
@pytest.mark.parametrize("detector", list(DETECTORS))
def test_train_and_evaluate_through_the_engine(tiny_overrides, tmp_path, detector):
    from lgd_cli.engine.evaluate import evaluate_checkpoint
    from lgd_cli.engine.train import train

    # Low test thresholds: after 3 iterations every score is near its prior, and AP needs detections.
    extra = ["SOLVER.MAX_ITER=3", "SOLVER.CHECKPOINT_PERIOD=3", "MODEL.FCOS.SCORE_THRESH_TEST=0.0",
             "MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.0"]
    if detector == "mask":
        extra.append("MODEL.DISTILLATOR.LABEL_ENCODER.LOAD_LABELMAP=True")
    cfg = build_config("demo", tiny_overrides + DETECTORS[detector] + extra, device="cpu")
    summary = train(cfg, tmp_path / "run")
    assert summary["iterations"] == 3 and summary["lgd"]
    results = evaluate_checkpoint(tmp_path / "run" / "model_final.pth", eval_teacher=True)
    tasks = {"bbox", "segm"} if detector == "mask" else {"bbox"}
    for who in ("student", "teacher"):
        assert set(results[who]) == tasks
        for task in tasks:
            assert 0.0 <= results[who][task]["AP"] <= 100.0


def test_fcos_labels_images_without_boxes_as_background(build):
    fcos = build("fcos", "MODEL.DISTILLATOR.ENABLED=False").student
    full, empty = make_batch(num_images=1)[0]["instances"], make_batch(num_images=1, boxes_per_image=0)[0]["instances"]
    anchors = fcos.anchor_generator([torch.zeros(1, 32, -(-64 // s), -(-64 // s)) for s in (8, 16, 32, 64, 128)])
    labels, boxes = fcos.label_anchors(anchors, [empty, full, empty])
    alone, alone_boxes = fcos.label_anchors(anchors, [full])
    assert (labels[0] == 3).all() and (labels[2] == 3).all() and (labels[1] < 3).any()
    assert torch.equal(labels[1], alone[0]) and torch.equal(boxes[1].tensor, alone_boxes[0].tensor)
