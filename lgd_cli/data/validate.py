"""COCO annotation checks: every problem is a DataError naming the file and the record, with a hint.

Returns a cleaned copy (bad boxes clipped or dropped, COCOeval's required fields filled) to train on.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from lgd_cli.config.choices import BAD_BOX_POLICIES
from lgd_cli.errors import ConfigError, DataError

EDGE_TOLERANCE = 0.5  # px: boxes this close outside the image are rounding, not errors; left as they are
_INT64 = 2**63
_MAX_SIDE = 2**31  # image width/height bound: larger is corruption, and would overflow later maths
_COCO_HINT = "expected a COCO instances json: {'images': [...], 'annotations': [...], 'categories': [...]}"


@dataclass
class ValidationReport:
    num_images: int
    num_annotations: int  # after dropping
    class_names: list[str]  # in category-id order, as detectron2's thing_classes
    num_clipped: int
    num_dropped: int
    num_filled: int  # annotations given a missing `area` or `iscrowd`
    warnings: list[str] = field(default_factory=list)
    cleaned: dict = field(default_factory=dict, repr=False)

    @property
    def changed(self) -> bool:
        """Whether `cleaned` differs from the file, so training must read the cleaned copy."""
        return bool(self.num_clipped or self.num_dropped or self.num_filled)


def _show(value) -> str:
    """A short description of a JSON value for messages: scalars and short flat lists as written."""
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        if len(value) > 6 or any(isinstance(v, (dict, list)) for v in value):
            return f"a list of {len(value)} items"
        text = "[" + ", ".join(_show(v) for v in value) + "]"
    else:
        text = repr(value) if isinstance(value, (str, bool, float)) or value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, what: str, hint: str | None = None):
        raise DataError(f"{self.path}: {where}: {what}", hint=hint or _COCO_HINT)

    def record(self, value, where: str) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"must be a JSON object, got {_show(value)}")
        return value

    def unique_id(self, value, section: str, index: int, seen: dict[int, int]) -> tuple[int, str]:
        """The `id` of record `section[index]`, refused if `seen` (id -> index) has it; records it.

        Returns (id, the record's name for messages).
        """
        where = f"{section}[{index}]"
        rid = self.int(self.get(self.record(value, where), "id", where), f"{where}.id")
        where = f"{section}[{index}] (id {rid})"
        if rid in seen:
            self.fail(where, f"duplicate {section[:-1]} id {rid}, also {section}[{seen[rid]}]")
        seen[rid] = index
        return rid, where

    def get(self, rec: dict, key: str, where: str):
        if key not in rec:
            self.fail(where, f'"{key}" is missing')
        return rec[key]

    def int(self, value, where: str, lo: int = -_INT64, hi: int = _INT64) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(where, f"must be an integer, got {_show(value)}")
        if not lo <= value < hi:
            self.fail(where, f"must be an integer from {lo} to {hi - 1}, got {_show(value)}")
        return value

    def number(self, value, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(where, f"must be a number, got {_show(value)}")
        try:
            x = float(value)
        except OverflowError:
            x = math.inf
        if not math.isfinite(x):
            self.fail(where, f"must be a finite number, got {_show(value)}")
        return x

    def numbers(self, value, where: str) -> list:
        if not isinstance(value, list):
            self.fail(where, f"must be a list of numbers, got {_show(value)}")
        try:  # fast path for the millions of polygon coordinates in COCO
            if all(type(v) in (int, float) for v in value) and math.isfinite(sum(value)):
                return value
        except OverflowError:
            pass
        for k, v in enumerate(value):
            self.number(v, f"{where}[{k}]")
        return value

    def segmentation(self, seg, where: str, width: int, height: int) -> None:
        if isinstance(seg, dict):  # RLE, as crowd regions use
            size, counts = self.get(seg, "size", where), self.get(seg, "counts", where)
            if size != [height, width] or not all(type(s) is int for s in size):
                self.fail(where, f"RLE size {_show(size)} is not the image's [height, width] [{height}, {width}]")
            if isinstance(counts, list):
                if not all(type(c) is int and c >= 0 for c in counts) or sum(counts) != width * height:
                    self.fail(where, "RLE counts must be non-negative integers summing to height*width")
            elif not isinstance(counts, str):
                self.fail(where, f"RLE counts must be a string or a list, got {_show(counts)}")
            return
        if not isinstance(seg, list):
            self.fail(where, f"must be a list of polygons or an RLE object, got {_show(seg)}")
        for k, poly in enumerate(seg):
            self.numbers(poly, f"{where}[{k}]")
            if len(poly) % 2 or len(poly) < 6:
                self.fail(f"{where}[{k}]",
                          f"a polygon needs at least 3 x,y points (6 numbers), got {len(poly)} numbers",
                          hint="fix or remove this polygon; an object without masks can omit 'segmentation'")


def _load(path: Path):
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"annotation file not found: {path}", hint="check the path") from None
    except OSError as e:
        raise DataError(f"cannot read annotation file {path}: {e.strerror or e}",
                        hint="check that it is a readable file") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}",
                        hint="the file may be truncated or hand-edited; re-export it") from None
    except (ValueError, RecursionError) as e:  # not UTF-8/16/32, absurd integers, absurd nesting
        raise DataError(f"{path}: not valid JSON: {e}", hint="re-export the file as UTF-8 JSON") from None


def _top_level(c: _Checker, data, keys: tuple[str, ...]) -> None:
    if not isinstance(data, dict):
        c.fail("top level", f"must be a JSON object, got {_show(data)}")
    for key in keys:
        if not isinstance(c.get(data, key, "top level"), list):
            c.fail(key, f"must be a list, got {_show(data[key])}")


def _categories(c: _Checker, data: dict) -> dict[int, tuple[int, dict]]:
    """Category id -> (index, record), checking ids are unique integers and names non-empty strings."""
    if not data["categories"]:
        c.fail("categories", "is empty: the dataset has no classes", hint="list the classes in 'categories'")
    categories: dict[int, tuple[int, dict]] = {}
    for i, cat in enumerate(data["categories"]):
        where = f"categories[{i}]"
        cid = c.int(c.get(c.record(cat, where), "id", where), f"{where}.id")
        where = f"categories[{i}] (id {cid})"
        name = c.get(cat, "name", where)
        if not isinstance(name, str) or not name.strip():
            c.fail(f"{where}.name", f"must be a non-empty string, got {_show(name)}")
        if cid in categories:
            c.fail(where, f"duplicate category id {cid}, also categories[{categories[cid][0]}]")
        categories[cid] = (i, cat)
    return categories


def read_class_names(json_path: Path) -> list[str]:
    """Class names of a COCO json in category-id order (detectron2's thing_classes), checking only those."""
    c = _Checker(Path(json_path))
    data = _load(c.path)
    _top_level(c, data, ("categories",))
    categories = _categories(c, data)
    return [categories[k][1]["name"] for k in sorted(categories)]


def _escapes_root(file_name: str) -> bool:
    return os.path.isabs(file_name) or os.path.normpath(file_name).split(os.sep)[0] == ".."


def validate_coco(json_path: Path, image_root: Path, bad_boxes: str = "clip", allow_outside_root: bool = False,
                  check_images: bool = True) -> ValidationReport:
    """Check a COCO-format annotation file and its images; raise DataError on the first problem.

    Args:
        json_path: COCO instances json.
        image_root: folder that image `file_name`s are relative to.
        bad_boxes: boxes with no area or outside their image: "clip" to the image (dropping what has no
            area left), "drop" them, or "error". Both fixes are counted in the report.
        allow_outside_root: accept `file_name`s that are absolute or climb out with "..".
        check_images: check that every image file exists.
    Returns:
        ValidationReport, whose `cleaned` dict is the dataset to train and evaluate on.
    """
    if bad_boxes not in BAD_BOX_POLICIES:
        raise ConfigError(f"bad_boxes must be one of {', '.join(BAD_BOX_POLICIES)}, got {bad_boxes!r}")
    json_path, image_root = Path(json_path), Path(image_root)
    c = _Checker(json_path)
    data = _load(json_path)
    _top_level(c, data, ("images", "annotations", "categories"))
    if not data["images"]:
        c.fail("images", "is empty: the dataset has no images", hint="point at a non-empty annotation file")
    warnings: list[str] = []

    # 1. Categories: unique integer ids, non-empty names.
    categories = _categories(c, data)
    class_names = [categories[k][1]["name"] for k in sorted(categories)]
    if len(set(class_names)) < len(class_names):
        warnings.append(f"{json_path}: some categories share a name; results will be hard to tell apart")

    # 2. Images: unique ids, positive sizes, file names inside the image folder that exist.
    images: dict[int, tuple[int, dict]] = {}
    missing: list[str] = []
    if check_images and not os.path.isdir(image_root):
        raise DataError(f"image folder not found: {image_root} (images of {json_path})", hint="check the path")
    image_index: dict[int, int] = {}
    for i, img in enumerate(data["images"]):
        iid, where = c.unique_id(img, "images", i, image_index)
        for key in ("width", "height"):
            c.int(c.get(img, key, where), f"{where}.{key}", 1, _MAX_SIDE)
        name = c.get(img, "file_name", where)
        if not isinstance(name, str) or not name or "\0" in name:
            c.fail(f"{where}.file_name", f"must be a non-empty file name, got {_show(name)}")
        if not allow_outside_root and _escapes_root(name):
            c.fail(f"{where}.file_name", f"{name!r} points outside the image folder {image_root}",
                   hint="use paths relative to the image folder, or allow files outside it")
        if check_images and not os.path.isfile(image_root / name):  # False, never raises, on odd names
            missing.append(name)
        images[iid] = (i, img)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DataError(f"{json_path}: {len(missing)} of {len(images)} image files are missing under {image_root}: "
                        f"{shown}", hint="check the image folder, or that the images were fully extracted")

    # 3. Annotations: unique ids, known image and class, a box inside its image, well-formed masks.
    seen: dict[int, int] = {}
    cleaned_anns: list[dict] = []
    num_clipped = num_dropped = num_filled = 0
    for i, ann in enumerate(data["annotations"]):
        _, where = c.unique_id(ann, "annotations", i, seen)
        image_id = c.int(c.get(ann, "image_id", where), f"{where}.image_id")
        if image_id not in images:
            c.fail(where, f"image_id {image_id} is not in images", hint="every annotation must refer to a listed image")
        category_id = c.int(c.get(ann, "category_id", where), f"{where}.category_id")
        if category_id not in categories:
            c.fail(where, f"category_id {category_id} is not in categories",
                   hint=f"known category ids: {', '.join(map(str, sorted(categories)[:20]))}")
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1) or isinstance(iscrowd, (bool, float)):
            c.fail(f"{where}.iscrowd", f"must be 0 or 1, got {_show(iscrowd)}")
        if ann.get("ignore", 0) != 0 or isinstance(ann.get("ignore", 0), (bool, float)):  # detectron2 refuses it
            c.fail(f"{where}.ignore", "a non-zero 'ignore' is not supported", hint="mark such objects iscrowd: 1")
        if "keypoints" in ann and len(c.numbers(ann["keypoints"], f"{where}.keypoints")) % 3:
            c.fail(f"{where}.keypoints", "must hold x, y, visibility triples")
        width, height = images[image_id][1]["width"], images[image_id][1]["height"]
        if ann.get("segmentation") is not None:
            c.segmentation(ann["segmentation"], f"{where}.segmentation", width, height)
        area = c.number(ann["area"], f"{where}.area") if "area" in ann else None
        if area is not None and area < 0:
            c.fail(f"{where}.area", f"must not be negative, got {_show(ann['area'])}")
        bbox = c.get(ann, "bbox", where)
        if len(c.numbers(bbox, f"{where}.bbox")) != 4:
            c.fail(f"{where}.bbox", f"must be [x, y, width, height], got {len(bbox)} numbers")
        x, y, w, h = map(float, bbox)

        # 4. Box policy. Clipped boxes keep their (smaller) area; what has no area left is dropped.
        problem = None
        if w <= 0 or h <= 0:
            problem = f"bbox {'width' if w <= 0 else 'height'} is {_show(bbox[2] if w <= 0 else bbox[3])}"
        elif max(-x, -y, x + w - width, y + h - height) > EDGE_TOLERANCE:
            problem = f"bbox {bbox} extends outside its {width}x{height} image"
        new = dict(ann)
        if problem:
            if bad_boxes == "error":
                c.fail(where, problem, hint="fix the box, or choose bad_boxes 'clip' or 'drop'")
            x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
            if bad_boxes == "drop" or x1 <= x0 or y1 <= y0:
                num_dropped += 1
                continue
            num_clipped += 1
            new["bbox"] = [x0, y0, x1 - x0, y1 - y0]
            if area is not None:
                new["area"] = min(area, (x1 - x0) * (y1 - y0))
        # 5. COCOeval reads `area` and `iscrowd` of every ground-truth object.
        if area is None or "iscrowd" not in ann:
            num_filled += 1
            new.setdefault("area", new["bbox"][2] * new["bbox"][3])
            new["iscrowd"] = iscrowd
        cleaned_anns.append(new)

    used = {a["category_id"] for a in cleaned_anns}
    unused = [categories[k][1]["name"] for k in sorted(categories) if k not in used]
    if unused:
        warnings.append(f"{json_path}: {len(unused)} classes have no annotations: {', '.join(unused[:10])}")
    if num_clipped or num_dropped:
        warnings.append(f"{json_path}: {num_clipped} boxes clipped to their image, {num_dropped} dropped")
    cleaned = {**data, "annotations": cleaned_anns}
    return ValidationReport(len(images), len(cleaned_anns), class_names, num_clipped, num_dropped, num_filled,
                            warnings, cleaned)
