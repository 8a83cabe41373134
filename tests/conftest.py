"""Shared fixtures: a tiny synthetic dataset and the overrides of a tiny, fast LGD config."""
from __future__ import annotations

import errno
import os
import shutil
import sys

import pytest
import torch

from lgd_cli.compat import detectron2 as _compat

# Test modules import detectron2 directly; the shims must be in place first.
_compat.apply()

# Keep every test's cache (synthetic set, cleaned jsons) out of the user's ~/.cache.
os.environ.setdefault("LGD_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "lgd-test-cache"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """8 training and 4 validation images of 64 px (COCO json + PNGs)."""
    from lgd_cli.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("tiny") / "shapes", num_train=8, num_val=4, image_size=64, seed=3)


@pytest.fixture(scope="session")
def tiny_overrides(tiny_data):
    """`--set` pairs turning the demo preset into a seconds-long run on `tiny_data` (C = 32, K = 5)."""
    return [
        "LGD.DATA.SOURCE=custom",
        f"LGD.DATA.TRAIN_JSON={tiny_data.train_json}", f"LGD.DATA.TRAIN_IMAGES={tiny_data.train_images}",
        f"LGD.DATA.VAL_JSON={tiny_data.val_json}", f"LGD.DATA.VAL_IMAGES={tiny_data.val_images}",
        "SOLVER.IMS_PER_BATCH=2", "SOLVER.MAX_ITER=6", "SOLVER.CHECKPOINT_PERIOD=3",
        "INPUT.MIN_SIZE_TRAIN=(64,)", "INPUT.MAX_SIZE_TRAIN=64", "INPUT.MIN_SIZE_TEST=64", "INPUT.MAX_SIZE_TEST=64",
        "MODEL.FPN.OUT_CHANNELS=32", "DATALOADER.NUM_WORKERS=0", "SEED=7",
        # p7 of a 64-px image is 1x1: GroupNorm(32) over 32 channels would see one value per group.
        "MODEL.RETINANET.NORM=",
    ]


@pytest.fixture(scope="session")
def tiny_cfg(tiny_overrides):
    from lgd_cli.config.build import build_config

    return build_config("demo", tiny_overrides, device="cpu")


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_overrides, tmp_path_factory):
    """model_final.pth of a real 2-iteration LGD run on `tiny_data`, trained once per session."""
    from lgd_cli.config.build import build_config
    from lgd_cli.engine.train import train

    out = tmp_path_factory.mktemp("run")
    train(build_config("demo", tiny_overrides + ["SOLVER.MAX_ITER=2", "SOLVER.CHECKPOINT_PERIOD=2"], device="cpu"), out)
    return out / "model_final.pth"


@pytest.fixture(scope="session")
def exportable_checkpoint(trained_checkpoint, tmp_path_factory):
    """A copy of `trained_checkpoint` whose head outputs are spread apart (see widen_head)."""
    path = tmp_path_factory.mktemp("widened") / "model_final.pth"
    shutil.copy(trained_checkpoint, path)
    widen_head(path)
    return path


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


@pytest.fixture
def lgd_cli_run():
    """The `run_cli` helper as a fixture."""
    return run_cli


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
