"""`lgd predict`: run a checkpoint's student on image files; drawn PNGs and COCO-format detections."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from detectron2.data.catalog import Metadata
from detectron2.data.detection_utils import convert_image_to_rgb, read_image
from detectron2.utils.visualizer import Visualizer

from lgd_cli.files import atomic_write_bytes
from lgd_cli.errors import DataError
from lgd_cli.export.trace import category_ids, load_student, model_input, set_score_thresh

DETECTIONS_FILE = "detections.json"


@dataclass
class PredictResult:
    """What `predict` wrote.

    Args:
        images: one row per input: (image path, drawn PNG path, number of detections).
        detections_file: the COCO-result JSON: [{image_id, file_name, category_id, bbox [x, y, w, h], score}].
    """

    images: list = field(default_factory=list)
    detections_file: Path | None = None
    score_thresh: float = 0.5


def check_images(images: Sequence[Path]) -> None:
    """Raise a DataError naming the first image that is missing or cannot be decoded."""
    if not images:
        raise DataError("no images given", hint="lgd predict CHECKPOINT IMAGE [IMAGE ...]")
    for path in images:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"image {path} does not exist" if not path.exists() else f"image {path} is not a file")
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, SyntaxError, ValueError) as exc:  # PIL reports corrupt files as any of these
            raise DataError(f"image {path} cannot be read ({exc})", hint="is it a PNG, JPEG or another image format?") from None


def _png_names(images: Sequence[Path]) -> list[str]:
    """`<stem>.png` per image; a stem already taken (a/1.jpg, b/1.jpg) gets its position appended."""
    names, seen = [], set()
    for index, path in enumerate(images):
        name = f"{Path(path).stem}.png"
        if name in seen:
            name = f"{Path(path).stem}-{index}.png"
        seen.add(name)
        names.append(name)
    return names


def predict(checkpoint: Path, images: Sequence[Path], output: Path = Path("predictions"), *,
            score_thresh: float = 0.5, device: str | None = None) -> PredictResult:
    """Detect objects in `images` with the student of `checkpoint` and write the results to `output`.

    Every image is checked before the model is loaded. Boxes are in the original image's pixels.

    Args:
        checkpoint: a file written by `lgd train`.
        images: image files, in any format Pillow reads.
        output: folder for one `<stem>.png` per image (detections drawn) and `detections.json`
            (COCO results: image_id is the image's position in `images`; category_id the training
            json's id, or the 1-based class index when that json is unavailable).
        score_thresh: keep detections scoring above this (it replaces the config's test threshold).
        device: cpu, cuda or cuda:N; None picks CUDA when available.
    """
    images = [Path(p) for p in images]
    check_images(images)
    student, cfg = load_student(checkpoint, device=device)
    set_score_thresh(student, score_thresh)  # lower scores are dropped before NMS
    metadata = Metadata(thing_classes=list(cfg.LGD.CLASS_NAMES))
    ids = category_ids(cfg)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)

    result, coco = PredictResult(score_thresh=score_thresh), []
    for index, (path, png) in enumerate(zip(images, _png_names(images))):
        try:
            image = read_image(str(path), format=cfg.INPUT.FORMAT)
        except (OSError, SyntaxError, ValueError) as exc:  # decodes past the header check
            raise DataError(f"image {path} cannot be read ({exc})") from None
        height, width = image.shape[:2]
        with torch.no_grad():
            instances = student([{"image": model_input(image, cfg).to(student.device),
                                  "height": height, "width": width}])[0]["instances"].to("cpu")
        drawn = Visualizer(convert_image_to_rgb(image, cfg.INPUT.FORMAT), metadata).draw_instance_predictions(instances)
        atomic_write_bytes(output / png, lambda f: Image.fromarray(drawn.get_image()).save(f, format="PNG"))
        for box, score, label in zip(instances.pred_boxes.tensor.tolist(), instances.scores.tolist(),
                                     instances.pred_classes.tolist()):
            x0, y0, x1, y1 = box
            coco.append({"image_id": index, "file_name": path.name, "category_id": ids[label],
                         "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)], "score": round(score, 5)})
        result.images.append((path, output / png, len(instances)))
    result.detections_file = output / DETECTIONS_FILE
    text = "[\n" + ",\n".join(json.dumps(det) for det in coco) + ("\n]\n" if coco else "]\n")  # one detection a line
    atomic_write_bytes(result.detections_file, lambda f: f.write(text.encode()))
    return result
