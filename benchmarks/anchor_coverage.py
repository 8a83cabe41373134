"""How well a preset's anchors cover its training boxes: the check behind the demo's anchor sizes.

For every training box (after the preset's training resize, smallest MIN_SIZE_TRAIN), the best IoU
over all anchors of the preset's anchor generator, and how many anchors reach the foreground
threshold. A box with no anchor at that IoU only gets RetinaNet's low-quality match, so a
large share of such boxes caps what the detector can learn.

    python benchmarks/anchor_coverage.py --preset demo
    python benchmarks/anchor_coverage.py --preset demo --scale 1 --scale 2 --scale 4

`--scale S` replaces the anchor sizes by S x the level stride (three octave steps per level,
as the presets use) to compare alternatives on the same boxes.
"""
from __future__ import annotations

import argparse
import math

import torch

from lgd_cli.compat.detectron2 import apply as apply_detectron2_patches

apply_detectron2_patches()

from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.data.transforms import ResizeShortestEdge  # noqa: E402
from detectron2.modeling import build_backbone  # noqa: E402
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator, build_anchor_generator  # noqa: E402
from detectron2.structures import BoxMode, Boxes, pairwise_iou  # noqa: E402

from lgd_cli.config.build import build_config  # noqa: E402
from lgd_cli.data.datasets import register_config_datasets  # noqa: E402


def coverage(cfg, scales: list[float]) -> list[tuple[str, float, float, float]]:
    """Rows (anchors, mean best IoU, share of boxes without a foreground anchor, positives per box)."""
    in_features = cfg.MODEL.RETINANET.IN_FEATURES
    shapes = build_backbone(cfg).output_shape()
    specs = [shapes[f] for f in in_features]
    threshold = cfg.MODEL.RETINANET.IOU_THRESHOLDS[-1]
    size = min(cfg.INPUT.MIN_SIZE_TRAIN)
    generators = [("preset", build_anchor_generator(cfg, specs))]
    for s in scales:
        sizes = [[s * spec.stride * 2 ** (i / 3) for i in range(3)] for spec in specs]
        generators.append((f"{s:g}x stride", DefaultAnchorGenerator(
            sizes=sizes, aspect_ratios=cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS,
            strides=[spec.stride for spec in specs], offset=cfg.MODEL.ANCHOR_GENERATOR.OFFSET)))
    best = {name: [] for name, _ in generators}
    positives = {name: [] for name, _ in generators}
    for record in DatasetCatalog.get(cfg.DATASETS.TRAIN[0]):
        if not record.get("annotations"):
            continue
        h, w = ResizeShortestEdge.get_output_shape(record["height"], record["width"], size, cfg.INPUT.MAX_SIZE_TRAIN)
        factor = h / record["height"]
        boxes = Boxes(torch.stack([torch.as_tensor(BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS),
                                                   dtype=torch.float32) for a in record["annotations"]]))
        boxes.scale(factor, factor)
        grids = [torch.zeros(1, 1, math.ceil(h / spec.stride), math.ceil(w / spec.stride)) for spec in specs]
        for name, generator in generators:
            iou = pairwise_iou(boxes, Boxes.cat(generator(grids)))
            best[name].append(iou.max(dim=1).values)
            positives[name].append((iou >= threshold).sum(dim=1).float())
    rows = []
    for name, _ in generators:
        b, p = torch.cat(best[name]), torch.cat(positives[name])
        rows.append((name, b.mean().item(), (p == 0).float().mean().item(), p.mean().item()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--scale", type=float, action="append", default=[],
                        help="also try anchors of S x the level stride (repeatable)")
    args = parser.parse_args()
    cfg = build_config(args.preset, device="cpu")
    if cfg.MODEL.META_ARCHITECTURE != "RetinaNet":
        raise SystemExit(f"{args.preset}: anchor coverage is measured for RetinaNet presets only")
    register_config_datasets(cfg, splits=("train",))
    threshold = cfg.MODEL.RETINANET.IOU_THRESHOLDS[-1]
    print(f"{args.preset}: anchors vs training boxes (foreground IoU >= {threshold})")
    print(f"{'anchors':<14} {'mean best IoU':>13} {'boxes w/o fg anchor':>20} {'fg anchors/box':>15}")
    for name, mean_best, unmatched, per_box in coverage(cfg, args.scale):
        print(f"{name:<14} {mean_best:>13.2f} {unmatched:>20.1%} {per_box:>15.1f}")


if __name__ == "__main__":
    main()
