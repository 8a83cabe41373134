"""The config keys lgd adds to detectron2's: MODEL.DISTILLATOR (the reference's names) and LGD."""
from __future__ import annotations

from detectron2.config import CfgNode as CN


# Top-level SOLVER keys the two-optimiser recipe does not read (docs/method.md §7): each optimiser
# reads the key of that name in its own block (_solver_block), and never uses Nesterov.
IGNORED_SOLVER_KEYS = ("BASE_LR", "MOMENTUM", "NESTEROV", "WEIGHT_DECAY", "LR_SCHEDULER_NAME", "STEPS", "GAMMA",
                       "WARMUP_FACTOR", "WARMUP_ITERS", "WARMUP_METHOD")


def _solver_block(base_lr: float) -> CN:
    # One optimiser's recipe. The reference reads these blocks, never the top-level SOLVER
    # learning-rate keys: every parameter gets this LR and weight decay (no exemptions).
    block = CN()
    block.OPTIMIZER = "SGD"  # "SGD" or "AdamW" (betas 0.9, 0.999), any case ("ADAMW" in the reference)
    block.BASE_LR = base_lr
    block.MOMENTUM = 0.9  # SGD only; never Nesterov, as in the reference
    block.WEIGHT_DECAY = 1e-4
    block.LR_SCHEDULER_NAME = "WarmupMultiStepLR"  # or "WarmupCosineLR" (detectron2's names)
    block.STEPS = (120000, 160000)
    block.GAMMA = 0.1
    block.WARMUP_FACTOR = 1e-3
    block.WARMUP_ITERS = 1000
    block.WARMUP_METHOD = "linear"
    # Kept for key parity with the reference; must stay False (mixed precision is SOLVER.AMP, for both).
    block.AMP = CN({"ENABLED": False})
    return block


def _add_fcos_config(cfg: CN) -> None:
    # The reference's FCOS keys (its FCOS is not detectron2's, which has no yacs config).
    # lgd builds detectron2's FCOS from them; keys marked "parity" are carried so that a
    # preset reads like the official config, and checked to hold the one value lgd supports.
    f = cfg.MODEL.FCOS = CN()
    f.NUM_CLASSES = 80
    f.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    f.NUM_CONVS = 4
    f.FPN_STRIDES = [8, 16, 32, 64, 128]  # parity: lgd reads the strides from the backbone
    f.PRIOR_PROB = 0.01
    f.CENTERNESS_ON_REG = True  # parity: detectron2's head predicts centerness from the box tower
    f.NORM_REG_TARGETS = True  # parity: box deltas normalised by the stride
    f.SCORE_THRESH_TEST = 0.05
    f.TOPK_CANDIDATES_TEST = 1000
    f.NMS_THRESH_TEST = 0.6
    f.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)  # parity
    f.FOCAL_LOSS_GAMMA = 2.0
    f.FOCAL_LOSS_ALPHA = 0.25
    f.IOU_LOSS_TYPE = "giou"  # parity
    f.CENTER_SAMPLING_RADIUS = 1.5
    # parity: per-level size ranges, as detectron2's FCOS derives them (4x and 8x the stride)
    f.OBJECT_SIZES_OF_INTEREST = [[-1, 64], [64, 128], [128, 256], [256, 512], [512, float("inf")]]
    f.NORM_SYNC = True  # parity: GroupNorm in the head has no cross-GPU statistics anyway
    f.NORM = "GN"  # GroupNorm(32) in the head, as in every FCOS row
    f.REG_WEIGHT = 2.0  # weight of the GIoU box loss
    cfg.MODEL.SHIFT_GENERATOR = CN({"NUM_SHIFTS": 1, "OFFSET": 0.5})  # parity: one point per cell, centred
    cfg.MODEL.NMS_TYPE = "normal"  # parity


def _add_swint_config(cfg: CN) -> None:
    # Swin Transformer backbone, the reference's key names (Swin-Tiny values).
    s = cfg.MODEL.SWINT = CN()
    s.EMBED_DIM = 96
    s.OUT_FEATURES = ["stage2", "stage3", "stage4", "stage5"]
    s.DEPTHS = [2, 2, 6, 2]
    s.NUM_HEADS = [3, 6, 12, 24]
    s.WINDOW_SIZE = 7
    s.MLP_RATIO = 4
    s.DROP_PATH_RATE = 0.2
    s.APE = False  # absolute position embedding: off in every row (and not supported)
    s.USE_CHECKPOINT = False  # activation checkpointing per Swin block: less memory, one more forward


def add_lgd_config(cfg: CN) -> None:
    """Add every key lgd reads to a detectron2 config (in place)."""
    _add_fcos_config(cfg)
    _add_swint_config(cfg)
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
    # lgd's variant (not in the reference): "teacher_better" counts a batch's loss_distill only
    # when the teacher's detection loss on it is below the student's. "always" is the method.
    d.DISTILL_GATE = "always"

    d.LABEL_ENCODER = CN()
    d.LABEL_ENCODER.BOX_FORMAT = "x1y1x2y2"  # the only format the reference implements
    d.LABEL_ENCODER.CATEGORY_FORMAT = "one_hot"  # or "norm_classes": class / K as one number
    d.LABEL_ENCODER.LOAD_LABELMAP = False  # append a 7x7 instance-mask crop (Mask R-CNN rows)
    # The four keys below are lgd's, not the reference's: each defaults to the official code's
    # rule ("reference") and names lgd's alternative (docs/method.md §10).
    # "reference": all boxes, the context box [0, 0, W, H] included, clamped to [0, W-1] x [0, H-1]
    # of the padded canvas (context descriptor (W-1)/W). "image": real boxes clamped to their own
    # image, context box added after clamping (descriptor exactly 1): no box depends on the
    # one-pixel-short canvas, and none reaches into another image's padding.
    d.LABEL_ENCODER.BOX_CLAMP = "reference"
    # "reference": an image without boxes gets a pseudo box [0, 0, 1, 1] (no class) and no context
    # box. "context": it gets only the context slot (no slot without ADD_CONTEXT_BOX): the teacher
    # sees an empty scene instead of a made-up one-pixel object in the corner.
    d.LABEL_ENCODER.EMPTY_IMAGE = "reference"

    d.TEACHER = CN()
    d.TEACHER.ADD_CONTEXT_BOX = True  # one whole-image box per image, standing for the scene
    d.TEACHER.DETACH_APPEARANCE_EMBED = False  # stop teacher gradients into student features
    d.TEACHER.INTERACT_PATTERN = "stuGuided"  # stuGuided | labelGuided | student_fill | teacher_fill
    d.TEACHER.NR_TRANSFORMER_HEADS = 8
    # lgd's variant (not in the reference): False keeps the teacher's `.tea` losses off the
    # detection head it shares with the student, which then learns from student maps only.
    d.TEACHER.HEAD_GRADIENT = True
    # "reference": boxes map to level l by H_l / H and W_l / W (feature over padded size).
    # "stride": by 1 / stride, so a cell's point is index x stride, where the detector's anchors
    # are, also on levels that round up (p6, p7 when the padded size is only 32-divisible).
    d.TEACHER.CELL_MAPPING = "reference"
    # RetinaNet/FCOS loss-normaliser EMA. "reference": updated by the student and again by the
    # teacher pass (twice per step, effective momentum 0.81; the teacher sees the second update).
    # "per_step": the teacher pass rewinds it, so both passes and the --no-lgd baseline share one
    # update per step at the detector's momentum 0.9.
    d.TEACHER.LOSS_NORMALIZER = "reference"
    d.TEACHER.SOLVER = _solver_block(0.01)

    d.STUDENT = CN()
    d.STUDENT.SOLVER = _solver_block(0.01)  # detector + distillation adapter

    # Mixed precision of both optimisers' step: detectron2's SOLVER.AMP.ENABLED, plus its dtype:
    # "bfloat16" (fp32's range, no loss scaling) or "float16" (one GradScaler for the two optimisers).
    cfg.SOLVER.AMP.DTYPE = "bfloat16"

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
    lgd.DATA.SKIP_BAD_IMAGES = False  # undecodable training images: skip with a warning instead of failing
    lgd.DATA.ALLOW_OUTSIDE_ROOT = False  # accept image file_names that are absolute or climb out with ".."
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
    lgd.SKIP_NONFINITE = 0  # batches with a non-finite loss skipped (no step) before training fails
    # What `lgd presets` shows; the paper's COCO val mAP for the paper rows.
    lgd.META = CN()
    lgd.META.DETECTOR = ""
    lgd.META.BACKBONE = ""
    lgd.META.SCHEDULE = ""
    lgd.META.PAPER_AP = -1.0
    lgd.META.PAPER_MASK_AP = -1.0  # Mask R-CNN rows: the paper's mask mAP
    lgd.META.DESCRIPTION = ""
