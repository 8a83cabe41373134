"""FCOS as a config-built detectron2 meta-architecture ("FCOS"), read from the reference's MODEL.FCOS keys.

detectron2 0.6 ships the FCOS model (RetinaNet-style FPN, GIoU loss, centre sampling, centerness
from the box tower) but no yacs builder. This subclass adds one, plus REG_WEIGHT on the box loss.
The reference's other FCOS keys describe what detectron2's FCOS hard-codes; they are checked to
hold that value, so a preset can never silently ask for something else.
"""
from __future__ import annotations

import math

import torch

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.meta_arch.fcos import FCOS as _D2FCOS
from detectron2.modeling.meta_arch.fcos import FCOSHead
from detectron2.structures import Boxes

from lgd_cli.errors import ConfigError

__all__ = ["FCOS", "check_fcos_parity"]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(math.isclose(float(x), float(y)) for x, y in zip(a, b))


def check_fcos_parity(cfg, strides: list[int]) -> None:
    """Raise ConfigError naming the first "parity" key that asks for something detectron2's FCOS does not do.

    Args:
        cfg: the config.
        strides: the backbone's strides of MODEL.FCOS.IN_FEATURES.
    """
    f = cfg.MODEL.FCOS

    def refuse(key: str, value, supported: str):
        raise ConfigError(f"{key}={value!r} is not supported: lgd's FCOS (detectron2's) supports only {supported}")

    if list(f.FPN_STRIDES) != list(strides):
        refuse("MODEL.FCOS.FPN_STRIDES", list(f.FPN_STRIDES),
               f"the backbone's strides of MODEL.FCOS.IN_FEATURES, {list(strides)}")
    for key, supported in (("CENTERNESS_ON_REG", True), ("NORM_REG_TARGETS", True)):
        if f[key] is not supported:
            refuse(f"MODEL.FCOS.{key}", f[key], str(supported))
    if not _same(f.BBOX_REG_WEIGHTS, (1.0, 1.0, 1.0, 1.0)):
        refuse("MODEL.FCOS.BBOX_REG_WEIGHTS", tuple(f.BBOX_REG_WEIGHTS), "(1.0, 1.0, 1.0, 1.0)")
    if str(f.IOU_LOSS_TYPE).lower() != "giou":
        refuse("MODEL.FCOS.IOU_LOSS_TYPE", f.IOU_LOSS_TYPE, "'giou'")
    # detectron2 assigns level l the objects whose largest side distance lies in (4 s_l, 8 s_l),
    # unbounded below on the first level and above on the last.
    expected = [[4.0 * s, 8.0 * s] for s in strides]
    sizes = [list(pair) for pair in f.OBJECT_SIZES_OF_INTEREST]
    ok = len(sizes) == len(expected) and all(len(p) == 2 for p in sizes)
    if ok:
        for i, ((lo, hi), (elo, ehi)) in enumerate(zip(sizes, expected)):
            ok &= (lo <= 0) if i == 0 else math.isclose(lo, elo)
            # The last level is unbounded: .inf in YAML, or any huge number (--set cannot write inf).
            ok &= hi >= 1e8 if i == len(sizes) - 1 else math.isclose(hi, ehi)
    if not ok:
        shown = [[-1 if i == 0 else e[0], float("inf") if i == len(expected) - 1 else e[1]] for i, e in enumerate(expected)]
        refuse("MODEL.FCOS.OBJECT_SIZES_OF_INTEREST", sizes, f"4x-8x the stride per level, {shown}")
    if f.NORM_SYNC is not True:
        refuse("MODEL.FCOS.NORM_SYNC", f.NORM_SYNC, "True (with GroupNorm there are no batch statistics to sync)")
    if cfg.MODEL.SHIFT_GENERATOR.NUM_SHIFTS != 1:
        refuse("MODEL.SHIFT_GENERATOR.NUM_SHIFTS", cfg.MODEL.SHIFT_GENERATOR.NUM_SHIFTS, "1")
    if not math.isclose(cfg.MODEL.SHIFT_GENERATOR.OFFSET, 0.5):
        refuse("MODEL.SHIFT_GENERATOR.OFFSET", cfg.MODEL.SHIFT_GENERATOR.OFFSET, "0.5 (points at cell centres)")
    if str(cfg.MODEL.NMS_TYPE).lower() != "normal":
        refuse("MODEL.NMS_TYPE", cfg.MODEL.NMS_TYPE, "'normal'")


@META_ARCH_REGISTRY.register()
class FCOS(_D2FCOS):
    """detectron2's FCOS, built from MODEL.FCOS.*, with the box (GIoU) loss scaled by REG_WEIGHT.

    Unlike detectron2 0.6's, it also trains on images without any box (all background).

    Args:
        reg_weight: factor on ``loss_fcos_loc`` (the reference's MODEL.FCOS.REG_WEIGHT).
        Every other argument is detectron2's FCOS's.
    """

    @configurable
    def __init__(self, *, reg_weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.reg_weight = reg_weight

    @classmethod
    def from_config(cls, cfg):
        f = cfg.MODEL.FCOS
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [name for name in f.IN_FEATURES if name not in shapes]
        if missing:
            raise ConfigError(f"MODEL.FCOS.IN_FEATURES names {missing}, which the backbone does not output",
                              hint=f"the backbone outputs {sorted(shapes)}")
        feature_shapes = [shapes[name] for name in f.IN_FEATURES]
        check_fcos_parity(cfg, [s.stride for s in feature_shapes])
        if len({s.channels for s in feature_shapes}) != 1:
            raise ConfigError("MODEL.FCOS.IN_FEATURES must all have the same number of channels")
        head = FCOSHead(input_shape=feature_shapes, conv_dims=[feature_shapes[0].channels] * f.NUM_CONVS,
                        num_classes=f.NUM_CLASSES, prior_prob=f.PRIOR_PROB, norm=f.NORM)
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": list(f.IN_FEATURES),
            "num_classes": f.NUM_CLASSES,
            "center_sampling_radius": f.CENTER_SAMPLING_RADIUS,
            "focal_loss_alpha": f.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": f.FOCAL_LOSS_GAMMA,
            "test_score_thresh": f.SCORE_THRESH_TEST,
            "test_topk_candidates": f.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": f.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "reg_weight": f.REG_WEIGHT,
        }

    @torch.no_grad()
    def label_anchors(self, anchors, gt_instances):
        """detectron2's labelling, which fails on an image without boxes: those get background everywhere."""
        nonempty = [gt for gt in gt_instances if len(gt) > 0]
        labels, boxes = super().label_anchors(anchors, nonempty) if nonempty else ([], [])
        labels, boxes = iter(labels), iter(boxes)
        count, device = sum(len(a) for a in anchors), anchors[0].device
        out_labels, out_boxes = [], []
        for gt in gt_instances:
            if len(gt) > 0:
                out_labels.append(next(labels))
                out_boxes.append(next(boxes))
            else:  # the boxes of background points are never read
                out_labels.append(torch.full((count,), self.num_classes, dtype=torch.long, device=device))
                out_boxes.append(Boxes(torch.zeros(count, 4, device=device)))
        return out_labels, out_boxes

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, pred_centerness):
        losses = super().losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, pred_centerness)
        losses["loss_fcos_loc"] = losses["loss_fcos_loc"] * self.reg_weight
        return losses
