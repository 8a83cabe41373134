"""Plain helpers shared by test modules, imported one way: `from tests.helpers import ...`.

pyproject.toml puts the repository root on sys.path (pytest's `pythonpath`), so `tests` is a
namespace package whether pytest runs as `pytest` or `python -m pytest`. Fixtures live in
tests/conftest.py instead.
"""
from __future__ import annotations

import errno
import itertools
import os
import subprocess
import sys
import time

import pytest
import torch

LGD = [sys.executable, "-m", "lgd_cli.cli"]


def lgd(*args, check=True):
    """Run `lgd ARGS` in a subprocess; with `check`, a non-zero exit fails with its output."""
    env = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run([*LGD, *args], capture_output=True, text=True, env=env, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"lgd {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def sets(pairs):
    """`--set` options for KEY=VALUE pairs."""
    return [x for pair in pairs for x in ("--set", pair)]


def signal_at_first_checkpoint(out, pairs, signum: int) -> tuple[int, str]:
    """Start `lgd train --output OUT`, send `signum` once its first checkpoint exists; (exit code, stderr).

    Checkpoints appear by rename, complete: the first one existing is the moment to signal.
    """
    proc = subprocess.Popen([*LGD, "train", "--output", str(out), *sets(pairs)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(out.glob("model_*.pth")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def fill_disk_after(monkeypatch, owner, name: str = "save", room: int = 4096) -> None:
    """Make the writer `owner.name(obj, f, ...)` (torch.save, torch.jit.save) meet a full disk
    after `room` bytes, through its own code: torch's zip writer then fails on closing the archive."""
    save = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda obj, f, *a, **k: save(obj, FillsUp(f, room), *a, **k))


class FillsUp:
    """Wraps a file: it takes `room` more bytes, then fails the way a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def two_loss_calls(model, batch):
    """The student's and a second (teacher) `losses` call of one step, both on the student's maps.

    Returns:
        (targets, first losses, normaliser after the first, second losses, normaliser after the second).
    """
    from detectron2.utils.events import EventStorage

    seams, gt = model.seams, [x["instances"] for x in batch]
    with EventStorage(0):
        images, maps = seams.extract(batch)
        targets = seams.new_targets()
        first = seams.losses(images, maps, gt, targets)
        n1 = model.student.loss_normalizer
        second = seams.losses(images, maps, gt, targets)
        return targets, first, n1, second, model.student.loss_normalizer


def run_cli(*args) -> int:
    """Run `lgd ARGS` through cli.main, as a user would; returns the exit code."""
    from lgd_cli import cli

    argv, sys.argv = sys.argv, ["lgd", *args]
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
    finally:
        sys.argv = argv
    return exit_info.value.code


def widen_head(path) -> None:
    """Spread the head's outputs of a 2-iteration checkpoint, in place.

    After 2 iterations every anchor still scores the prior 0.01 within 1e-7, so which detections
    survive top-k and NMS is decided by float noise and "the same detections" is undefined. Large
    random classification and regression weights give distinct scores (about 0.1) and boxes away
    from the anchors: a comparison with something to compare.
    """
    state = torch.load(path, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for name, std in (("cls_score", 300.0), ("bbox_pred", 50.0)):
        weight = state["model"][f"student.head.{name}.weight"]
        weight += std * torch.randn(weight.shape, generator=generator)
    state["model"]["student.head.cls_score.bias"] += 2.0
    torch.save(state, path)


def make_batch(num_images=2, boxes_per_image=2, size=64, seed=0, *, min_side=6, masks=None):
    """Random images with random boxes of 3 classes, as the mapper gives them to the model.

    masks: None, "polygon" (a diamond inscribed in each box) or "bitmask" (the same, rasterised).
    """
    from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(num_images):
        inst = Instances((size, size))
        xy = torch.rand(boxes_per_image, 2, generator=g) * size / 2
        wh = torch.rand(boxes_per_image, 2, generator=g) * size / 3 + min_side
        boxes = torch.cat([xy, xy + wh], 1)
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, 3, (boxes_per_image,), generator=g)
        if masks and boxes_per_image:  # detectron2's mapper gives images without objects no gt_masks
            polygons = PolygonMasks([[[(x0 + x1) / 2, y0, x1, (y0 + y1) / 2, (x0 + x1) / 2, y1, x0, (y0 + y1) / 2]]
                                     for x0, y0, x1, y1 in boxes.tolist()])
            inst.gt_masks = BitMasks.from_polygon_masks(polygons, size, size) if masks == "bitmask" else polygons
        batch.append({"image": torch.randint(0, 255, (3, size, size), generator=g).float(), "instances": inst})
    return batch


def losses_of(model, batch):
    """One training forward (detectron2's heads log into an EventStorage)."""
    from detectron2.utils.events import EventStorage

    with EventStorage(0):
        return model(batch)


def make_trainer(tiny_overrides, *extra, size: int = 64):
    """(cfg, model, trainer): an LGDTrainer with the schedule hook over 3 random `size`-px batches."""
    from lgd_cli.config.build import build_config
    from lgd_cli.engine.amp import MixedPrecision
    from lgd_cli.engine.hooks import LGDScheduleHook
    from lgd_cli.engine.optimizers import build_optimizers
    from lgd_cli.engine.trainer import LGDTrainer
    from lgd_cli.modeling.distiller import build_distiller

    sizes = [f"INPUT.MIN_SIZE_TRAIN=({size},)", f"INPUT.MAX_SIZE_TRAIN={size}"]
    cfg = build_config("demo", tiny_overrides + sizes + list(extra), device="cpu")
    torch.manual_seed(0)
    model = build_distiller(cfg)
    optimizers, schedulers = build_optimizers(cfg, model)
    loader = itertools.cycle([make_batch(seed=i, size=size) for i in range(3)])
    trainer = LGDTrainer(model, loader, optimizers, model.frozen_backbone_parameters(),
                         amp=MixedPrecision.from_config(cfg))
    d = cfg.MODEL.DISTILLATOR
    trainer.register_hooks([LGDScheduleHook(model, schedulers, d.PRE_NONDISTILL_ITERS, d.POST_NONDISTILL_ITERS,
                                            d.PRE_FREEZE_STUDENT_BACKBONE_ITERS)])
    return cfg, model, trainer


# `--set` pairs (on top of tiny_overrides) turning the tiny RetinaNet into a tiny FCOS, Faster or Mask R-CNN:
# the R-CNN heads shrunk to match 64-px images and 32 channels.
# The SGD recipe of fcos-demo and faster-rcnn-demo (demo itself trains with AdamW).
_SGD_SET = [f"MODEL.DISTILLATOR.{who}.SOLVER.{key}={value}" for who in ("STUDENT", "TEACHER")
            for key, value in (("OPTIMIZER", "SGD"), ("BASE_LR", 0.01), ("WEIGHT_DECAY", 0.0001))]
_FCOS_SET = ["MODEL.META_ARCHITECTURE=FCOS",
             # p7 of a 64-px image is 1x1: GroupNorm(32) over 32 channels would see one value per group.
             "MODEL.FCOS.NORM=", *_SGD_SET]
_RCNN_SET = [
    "MODEL.META_ARCHITECTURE=GeneralizedRCNN", "MODEL.BACKBONE.NAME=build_resnet_fpn_backbone",
    "MODEL.RESNETS.OUT_FEATURES=['res2','res3','res4','res5']", "MODEL.FPN.IN_FEATURES=['res2','res3','res4','res5']",
    "MODEL.ANCHOR_GENERATOR.SIZES=[[8],[16],[32],[64],[128]]", "MODEL.RPN.IN_FEATURES=['p2','p3','p4','p5','p6']",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE=64", "MODEL.RPN.PRE_NMS_TOPK_TRAIN=200", "MODEL.RPN.POST_NMS_TOPK_TRAIN=50",
    "MODEL.RPN.PRE_NMS_TOPK_TEST=200", "MODEL.RPN.POST_NMS_TOPK_TEST=50",
    "MODEL.ROI_HEADS.NAME=StandardROIHeads", "MODEL.ROI_HEADS.IN_FEATURES=['p2','p3','p4','p5']",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE=32", "MODEL.ROI_BOX_HEAD.NAME=FastRCNNConvFCHead",
    "MODEL.ROI_BOX_HEAD.NUM_FC=2", "MODEL.ROI_BOX_HEAD.FC_DIM=64", "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION=7",
    "MODEL.ROI_MASK_HEAD.NAME=MaskRCNNConvUpsampleHead", "MODEL.ROI_MASK_HEAD.NUM_CONV=2",
    "MODEL.ROI_MASK_HEAD.CONV_DIM=32", "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION=14",
    # The reference's R-CNN rows.
    "MODEL.DISTILLATOR.TEACHER.ADD_CONTEXT_BOX=False", "MODEL.DISTILLATOR.TEACHER.DETACH_APPEARANCE_EMBED=True",
    *_SGD_SET,
]
STUDENT_OVERRIDES = {
    "fcos": _FCOS_SET,
    "faster": _RCNN_SET,
    "mask": _RCNN_SET + ["MODEL.MASK_ON=True"],
}
