"""A deterministic COCO-format detection set of coloured shapes: lgd's embedded default dataset.

Boxes, polygons, occlusion and empty images, written atomically and cached for reuse.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lgd_cli.errors import ConfigError, DataError

CLASS_NAMES = ("circle", "square", "triangle", "star", "cross")
VERSION = 1
MARKER = "COMPLETE.json"  # written last, inside the temp folder, so its presence means a whole set
EMPTY_EVERY = 20  # every 20th image (5%) has no objects: the edge case detectors must handle
SIZE_RANGE = (12 / 128, 72 / 128)  # shape diameter / image side, log-uniform: 12-72 px at 128 px
MIN_VISIBLE = 0.3  # a placement that hides more than 70% of an earlier shape is retried
# Enough for a detector trained from scratch for ~10 CPU minutes to reach a clearly non-zero AP.
DEFAULT_SIZES = {"num_train": 1000, "num_val": 200, "image_size": 128, "seed": 0}


@dataclass(frozen=True)
class SyntheticPaths:
    train_json: Path
    train_images: Path
    val_json: Path
    val_images: Path
    class_names: tuple[str, ...]


def _paths(root: Path) -> SyntheticPaths:
    return SyntheticPaths(root / "annotations" / "instances_train.json", root / "train",
                          root / "annotations" / "instances_val.json", root / "val", CLASS_NAMES)


def _unit_shape(name: str) -> np.ndarray:
    """Vertices (V, 2) of a shape inscribed in the unit circle."""
    if name == "circle":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) / np.sqrt(2)
    if name == "triangle":
        t = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == "star":
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    assert name == "cross", name
    a, b = 0.3, 0.95  # arm half-width, arm reach
    return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a],
                     [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (H, W, 3) float image: a two-colour gradient plus smooth blotches."""
    c0, c1 = rng.uniform(0, 255, (2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    blotch = Image.fromarray(rng.uniform(0, 255, (4, 4)).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return c0 + (c1 - c0) * ramp + (np.asarray(blotch, np.float64)[..., None] - 128) * 0.25


def _render(rng: np.random.Generator, index: int, size: int) -> tuple[np.ndarray, list[dict]]:
    """Draw one image; returns (H, W, 3) uint8 pixels and its objects (category_id, polygon)."""
    canvas = _background(rng, size)
    num_objects = 0 if index % EMPTY_EVERY == EMPTY_EVERY - 1 else int(rng.integers(1, 6))
    objects, full, visible = [], [], []
    for _ in range(num_objects):
        for _attempt in range(10):
            label = int(rng.integers(len(CLASS_NAMES)))
            diameter = size * float(np.exp(rng.uniform(*np.log(SIZE_RANGE))))
            angle = rng.uniform(-np.pi, np.pi) if CLASS_NAMES[label] != "circle" else 0.0
            rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            pts = _unit_shape(CLASS_NAMES[label]) @ rot.T * diameter / 2
            lo, hi = pts.min(0), pts.max(0)
            pts = np.round(pts + rng.uniform(-lo, size - hi), 2)  # whole shape inside the image
            mask_img = Image.new("L", (size, size))
            ImageDraw.Draw(mask_img).polygon([tuple(p) for p in pts], fill=1)
            mask = np.asarray(mask_img, bool)
            # 1. Occlusion: later shapes cover earlier ones, but never almost completely.
            if mask.sum() > 0 and all((v & ~mask).sum() >= MIN_VISIBLE * f.sum() for v, f in zip(visible, full)):
                break
        else:
            continue
        visible = [v & ~mask for v in visible] + [mask]
        full.append(mask)
        # 2. A fill colour that stands out from the background under this shape.
        bg = canvas[mask].mean(0)
        colour = rng.uniform(0, 255, 3)
        for _retry in range(20):
            if np.linalg.norm(colour - bg) > 100:
                break
            colour = rng.uniform(0, 255, 3)
        canvas[mask] = colour
        objects.append({"category_id": label + 1, "polygon": pts})
    canvas += rng.normal(0, 8, canvas.shape)  # sensor noise over shapes and background alike
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8), objects


def _write_split(root: Path, split: str, split_id: int, count: int, size: int, seed: int) -> None:
    (root / split).mkdir(parents=True)
    images, annotations = [], []
    for i in range(count):
        # One generator per image: a set of N images is the prefix of a larger one.
        pixels, objects = _render(np.random.default_rng([seed, split_id, i]), i, size)
        file_name = f"{i + 1:06d}.png"
        Image.fromarray(pixels).save(root / split / file_name, format="PNG")
        images.append({"id": i + 1, "file_name": file_name, "width": size, "height": size})
        for obj in objects:
            pts = obj["polygon"]
            (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
            x, y = pts[:, 0], pts[:, 1]
            area = 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": obj["category_id"],
                "bbox": [float(x0), float(y0), round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
                "area": round(area, 2), "iscrowd": 0, "segmentation": [[float(v) for v in pts.ravel()]],
            })
    data = {
        "info": {"description": f"lgd synthetic shapes v{VERSION}, {split}, seed {seed}"},
        "images": images, "annotations": annotations,
        "categories": [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(CLASS_NAMES)],
    }
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data, sort_keys=True))


def generate(out_dir: Path, num_train: int = 1000, num_val: int = 200, image_size: int = 128,
             seed: int = 0) -> SyntheticPaths:
    """Write the shapes set to `out_dir`, replacing what is there; the same arguments give the same bytes.

    Args:
        out_dir: folder to hold annotations/instances_{train,val}.json and train/, val/ PNGs.
        num_train, num_val: number of images per split.
        image_size: side of the square images in pixels (shapes are 9-56% of it across).
        seed: seed of every random choice.
    Returns:
        SyntheticPaths of the written set.
    """
    if min(num_train, num_val) < 1 or image_size < 32:
        raise ConfigError(f"a synthetic set needs at least 1 image per split of at least 32 px, got "
                          f"{num_train} train, {num_val} val, {image_size} px")
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    _publish(_build(out_dir, num_train, num_val, image_size, seed), out_dir)
    return _paths(out_dir)


def _build(out_dir: Path, num_train: int, num_val: int, image_size: int, seed: int) -> Path:
    """Write a whole set into a temp folder beside `out_dir` (same file system) and return it."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_split(tmp, "train", 0, num_train, image_size, seed)
        _write_split(tmp, "val", 1, num_val, image_size, seed)
        marker = {"version": VERSION, "num_train": num_train, "num_val": num_val,
                  "image_size": image_size, "seed": seed}
        (tmp / MARKER).write_text(json.dumps(marker, sort_keys=True))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a dataset folder is not
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def cache_root() -> Path:
    """lgd's cache folder: $LGD_CACHE, else ~/.cache/lgd."""
    return Path(os.environ.get("LGD_CACHE") or Path.home() / ".cache" / "lgd")


def default_cache_dir() -> Path:
    return cache_root() / f"synthetic-v{VERSION}"


def ensure_synthetic(cache_dir: Path | None = None) -> SyntheticPaths:
    """Return the default shapes set, generating it into `cache_dir` on first use.

    Args:
        cache_dir: folder of the set; default $LGD_CACHE/synthetic-v1 or ~/.cache/lgd/synthetic-v1.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not _is_complete(root):
        _check_replaceable(root)
        tmp = _build(root, **DEFAULT_SIZES)
        if _is_complete(root):  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _publish(tmp, root)
    return _paths(root)


def _is_complete(root: Path) -> bool:
    try:
        return json.loads((root / MARKER).read_text()) == {"version": VERSION, **DEFAULT_SIZES}
    except (OSError, ValueError):
        return False


def _check_replaceable(root: Path) -> None:
    """Refuse to replace a folder that holds something other than a shapes set."""
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise DataError(f"{root} exists and is not an lgd synthetic dataset; refusing to replace it",
                        hint="choose an empty or new folder, or remove this one yourself")
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} exists and is not a folder", hint="choose another folder")


def _publish(tmp: Path, root: Path) -> None:
    """Move a finished set into place; an older set there is swapped out, then deleted."""
    try:
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / "set")
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there if a replace failed
