"""`lgd predict`: run a checkpoint's student on image files; drawn PNGs and COCO-format detections."""
from __future__ import annotations

import glob
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from PIL import Image
from detectron2.data.catalog import Metadata
from detectron2.data.detection_utils import convert_image_to_rgb, read_image
from detectron2.utils.visualizer import Visualizer

from lgd_cli.files import atomic_write_bytes
from lgd_cli.errors import DataError
from lgd_cli.export.trace import category_ids, load_student, model_input, set_score_thresh

DETECTIONS_FILE = "detections.json"


# Images drawn smaller than this (long side, pixels) are drawn enlarged to it, so labels fit.
DRAWN_MIN_SIDE = 512


class PredictedImage(NamedTuple):
    image: Path
    drawn: Path  # the PNG with its detections drawn
    detections: int  # above the threshold
    best_score: float | None  # of any detection, kept or not; None when the model found none at all


@dataclass
class PredictResult:
    """What `predict` wrote.

    Args:
        images: one PredictedImage per input.
        detections_file: the COCO-result JSON: [{image_id, file_name, category_id, bbox [x, y, w, h], score}].
    """

    images: list = field(default_factory=list)
    detections_file: Path | None = None
    score_thresh: float = 0.5


def expand_images(paths: Sequence[Path | str]) -> list[Path]:
    """The image files `paths` name: a folder stands for its image files (sorted), a pattern with
    * ? or [ ] (quoted, so the shell left it) for the files it matches (sorted); DataError when
    a folder or pattern yields none."""
    suffixes = set(Image.registered_extensions())  # what Pillow can open
    found = []
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
            if not files:
                raise DataError(f"folder {path} holds no image files",
                                hint=f"images are files Pillow opens ({', '.join(sorted(suffixes)[:6])}, ...)")
            found += files
        elif not path.exists() and any(c in str(arg) for c in "*?["):
            files = sorted(Path(p) for p in glob.glob(str(arg), recursive=True) if Path(p).is_file())
            if not files:
                raise DataError(f"no file matches {arg}")
            found += files
        else:
            found.append(path)
    return found


def image_ids_from(annotations: Path, images: Sequence[Path]) -> list[int]:
    """The id under which `annotations` (COCO json) lists each image, matched by file_name (the image
    path's last components); DataError naming the first image it does not list."""
    try:
        listed = json.loads(Path(annotations).read_text())["images"]
        entries = [(Path(img["file_name"]).parts, int(img["id"])) for img in listed]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{annotations} is not a COCO json with images (file_name, id): {exc}") from None
    ids = []
    for path in images:
        parts = Path(path).resolve().parts
        matches = [(len(names), image_id) for names, image_id in entries if names and parts[-len(names):] == names]
        if not matches:
            raise DataError(f"image {path} is not in {annotations} (no images[].file_name matches it)",
                            hint="give the json the images come from, or leave out --data (ids are then positions)")
        ids.append(max(matches)[1])  # the longest file_name that matches: the most specific entry
    return ids


def suggested_threshold(best: float) -> float:
    """A round threshold below `best` (0.31 -> 0.3, 0.012 -> 0.01), to suggest when nothing passed."""
    if best <= 0:
        return 0.0
    step = 10 ** math.floor(math.log10(best))
    value = math.floor(best / step) * step
    if value >= best:
        value -= step
    if value <= 0:  # best is a power of ten: one step of the next decade below it (0.01 -> 0.009)
        step /= 10
        value = math.floor(best / step) * step - step
    return round(value, 10)


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
            score_thresh: float = 0.5, device: str | None = None, annotations: Path | None = None) -> PredictResult:
    """Detect objects in `images` with the student of `checkpoint` and write the results to `output`.

    Every image is checked before the model is loaded. Boxes are in the original image's pixels.

    Args:
        checkpoint: a file written by `lgd train`.
        images: image files, in any format Pillow reads; folders and glob patterns (expand_images).
        output: folder for one `<stem>.png` per image (detections drawn; small images enlarged to
            DRAWN_MIN_SIDE) and `detections.json` (COCO results: image_id is the image's id in
            `annotations`, else its position in `images`; category_id the training json's id, or
            the 1-based class index when that json is unavailable).
        score_thresh: keep detections scoring above this (it replaces the config's test threshold).
        device: cpu, cuda or cuda:N; None picks CUDA when available.
        annotations: a COCO json listing the images (matched by file_name), for their ids.
    """
    images = expand_images(images)
    check_images(images)
    image_ids = image_ids_from(annotations, images) if annotations is not None else list(range(len(images)))
    student, cfg = load_student(checkpoint, device=device)
    # Everything is scored, so the best score below the threshold can be named; what passes it is
    # what the threshold itself would keep (it drops before top-k and NMS only what scores below).
    set_score_thresh(student, 0.0)
    metadata = Metadata(thing_classes=list(cfg.LGD.CLASS_NAMES))
    ids = category_ids(cfg)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)

    result, coco = PredictResult(score_thresh=score_thresh), []
    for image_id, path, png in zip(image_ids, images, _png_names(images)):
        try:
            image = read_image(str(path), format=cfg.INPUT.FORMAT)
        except (OSError, SyntaxError, ValueError) as exc:  # decodes past the header check
            raise DataError(f"image {path} cannot be read ({exc})") from None
        height, width = image.shape[:2]
        with torch.no_grad():
            scored = student([{"image": model_input(image, cfg).to(student.device),
                               "height": height, "width": width}])[0]["instances"].to("cpu")
        best = float(scored.scores.max()) if len(scored) else None
        instances = scored[scored.scores > score_thresh]
        drawn = _draw(convert_image_to_rgb(image, cfg.INPUT.FORMAT), metadata, instances)
        atomic_write_bytes(output / png, lambda f: Image.fromarray(drawn).save(f, format="PNG"))
        for box, score, label in zip(instances.pred_boxes.tensor.tolist(), instances.scores.tolist(),
                                     instances.pred_classes.tolist()):
            x0, y0, x1, y1 = box
            coco.append({"image_id": image_id, "file_name": path.name, "category_id": ids[label],
                         "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)], "score": round(score, 5)})
        result.images.append(PredictedImage(path, output / png, len(instances), best))
    result.detections_file = output / DETECTIONS_FILE
    text = "[\n" + ",\n".join(json.dumps(det) for det in coco) + ("\n]\n" if coco else "]\n")  # one detection a line
    atomic_write_bytes(result.detections_file, lambda f: f.write(text.encode()))
    return result


def _draw(rgb, metadata, instances):
    """The image with its detections drawn, enlarged to DRAWN_MIN_SIDE when smaller.

    detectron2 sizes labels from the drawing's size, 10 px at least: on a 128-px image drawn as it
    is, they are larger than the objects and cut at the edges; on its 512-px drawing they are as
    on a 512-px image.
    """
    scale = max(1.0, DRAWN_MIN_SIDE / max(rgb.shape[:2]))
    return Visualizer(rgb, metadata, scale=scale).draw_instance_predictions(instances).get_image()
