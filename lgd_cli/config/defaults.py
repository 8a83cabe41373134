"""The config keys lgd adds to detectron2's: MODEL.DISTILLATOR (the reference's names) and LGD."""
from __future__ import annotations

from detectron2.config import CfgNode as CN


def _solver_block(base_lr: float) -> CN:
    # One optimiser's recipe. The reference reads these blocks, never the top-level SOLVER
    # learning-rate keys: every parameter gets this LR and weight decay (no exemptions).
    block = CN()
    block.OPTIMIZER = "SGD"  # "SGD" or "AdamW" (betas 0.9, 0.999)
    block.BASE_LR = base_lr
    block.MOMENTUM = 0.9  # SGD only; never Nesterov, as in the reference
    block.WEIGHT_DECAY = 1e-4
    block.LR_SCHEDULER_NAME = "WarmupMultiStepLR"  # detectron2 scheduler names
    block.STEPS = (120000, 160000)
    block.GAMMA = 0.1
    block.WARMUP_FACTOR = 1e-3
    block.WARMUP_ITERS = 1000
    block.WARMUP_METHOD = "linear"
    block.AMP = CN({"ENABLED": False})  # kept for key parity with the reference; must stay False
    return block


def add_lgd_config(cfg: CN) -> None:
    """Add every key lgd reads to a detectron2 config (in place)."""
    d = cfg.MODEL.DISTILLATOR = CN()
    d.ENABLED = True  # False (`lgd train --no-lgd`): the plain student, same recipe: the baseline
    d.LAMBDA = 1.0  # weight of loss_distill
    # Distillation is off while iter < PRE or iter > MAX_ITER - POST: in the PRE window only
    # the adapter learns from loss_distill (student features detached), teacher still trains.
    d.PRE_NONDISTILL_ITERS = 40000  # the reference's code default; every paper row sets 30000
    d.POST_NONDISTILL_ITERS = 0
    # Bottom-up backbone (ResNet/Swin, not FPN) receives no update before this iteration.
    d.PRE_FREEZE_STUDENT_BACKBONE_ITERS = 10000  # code default; every paper row sets 20000
    d.EVAL_TEACHER = True  # also evaluate the teacher (needs ground truth: an upper bound only)

    d.LABEL_ENCODER = CN()
    d.LABEL_ENCODER.BOX_FORMAT = "x1y1x2y2"  # the only format the reference implements
    d.LABEL_ENCODER.CATEGORY_FORMAT = "one_hot"  # or "norm_classes": class / K as one number
    d.LABEL_ENCODER.LOAD_LABELMAP = False  # append a 7x7 instance-mask crop (Mask R-CNN rows)

    d.TEACHER = CN()
    d.TEACHER.ADD_CONTEXT_BOX = True  # one whole-image box per image, standing for the scene
    d.TEACHER.DETACH_APPEARANCE_EMBED = False  # stop teacher gradients into student features
    d.TEACHER.INTERACT_PATTERN = "stuGuided"  # stuGuided | labelGuided | student_fill | teacher_fill
    d.TEACHER.NR_TRANSFORMER_HEADS = 8
    d.TEACHER.SOLVER = _solver_block(0.01)

    d.STUDENT = CN()
    d.STUDENT.SOLVER = _solver_block(0.01)  # detector + distillation adapter

    lgd = cfg.LGD = CN()
    lgd.PRESET = ""  # name of the preset this config came from (recorded in checkpoints)
    lgd.CLASS_NAMES = []  # set from the training data by build_config
    lgd.DATA = CN()
    lgd.DATA.SOURCE = "synthetic"  # synthetic | coco | custom
    lgd.DATA.ROOT = "datasets/coco"  # SOURCE=coco: annotations/ + train2017/ + val2017/
    lgd.DATA.TRAIN_JSON = ""  # SOURCE=custom: any COCO-format dataset
    lgd.DATA.TRAIN_IMAGES = ""
    lgd.DATA.VAL_JSON = ""
    lgd.DATA.VAL_IMAGES = ""
    lgd.DATA.BAD_BOXES = "clip"  # clip | drop | error: what to do with boxes outside the image
    # Small presets state their windows as fractions of SOLVER.MAX_ITER so that `--iters`
    # keeps them in proportion; build_config turns them into the iteration keys above.
    lgd.RELATIVE_SCHEDULE = CN()
    lgd.RELATIVE_SCHEDULE.ENABLED = False
    lgd.RELATIVE_SCHEDULE.PRE_NONDISTILL = 0.0
    lgd.RELATIVE_SCHEDULE.POST_NONDISTILL = 0.0
    lgd.RELATIVE_SCHEDULE.PRE_FREEZE_BACKBONE = 0.0
    lgd.RELATIVE_SCHEDULE.STEPS = (0.75, 0.9)  # LR decay points of both optimisers
    lgd.RELATIVE_SCHEDULE.WARMUP = 0.05
    lgd.CHECKPOINT_KEEP = 3  # newest periodic checkpoints kept (final always kept)
    # What `lgd presets` shows; the paper's COCO val mAP for the paper rows.
    lgd.META = CN()
    lgd.META.DETECTOR = ""
    lgd.META.BACKBONE = ""
    lgd.META.SCHEDULE = ""
    lgd.META.PAPER_AP = -1.0
    lgd.META.DESCRIPTION = ""
