"""Register COCO and any COCO-format json + image folder in detectron2's catalogs, validated first."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from lgd_cli.data.synthetic import SyntheticPaths, cache_root, ensure_synthetic
from lgd_cli.data.validate import read_class_names, validate_coco
from lgd_cli.errors import DataError
from lgd_cli.files import atomic_write_bytes, json_text

__all__ = ["TRAIN_DATASET", "VAL_DATASET", "coco_paths", "read_class_names", "register_coco_json",
           "register_config_datasets", "synthetic_paths"]

# The names the config's datasets are registered under (DATASETS.TRAIN / DATASETS.TEST).
TRAIN_DATASET, VAL_DATASET = "lgd_train", "lgd_val"
COCO_LAYOUT = """expected the standard COCO 2017 layout (images and annotations from cocodataset.org):
  {root}/
    annotations/instances_train2017.json
    annotations/instances_val2017.json
    train2017/   118287 images
    val2017/     5000 images
point --data-root (LGD.DATA.ROOT) at the folder holding annotations/, train2017/ and val2017/"""

logger = logging.getLogger(__name__)
_registered: dict[str, tuple] = {}  # dataset name -> the files and options it was registered from


def register_coco_json(name: str, json_path: Path, image_root: Path, cache_dir: Path | None = None,
                       **validate_opts) -> list[str]:
    """Validate a COCO-format dataset, then register it in DatasetCatalog and MetadataCatalog.

    As detectron2's `register_coco_instances`, with metadata set up front for COCOEvaluator
    (`json_file`, `thing_classes`, `thing_dataset_id_to_contiguous_id`). When validation changed the
    annotations (boxes clipped or dropped, `area`/`iscrowd` filled), the cleaned json is written to
    `cache_dir` and both training and evaluation read it. Registering a name again with the same,
    unchanged files and options does nothing; with anything different it replaces the registration.

    Args:
        name: dataset name, as used in cfg.DATASETS.
        json_path: COCO instances json.
        image_root: folder the images' `file_name`s are relative to.
        cache_dir: where cleaned jsons go; default <lgd cache>/cleaned.
        **validate_opts: `bad_boxes`, `allow_outside_root`, `check_images` of `validate_coco`.
    Returns:
        The class names in category-id order (detectron2's thing_classes).
    """
    json_path, image_root = Path(json_path).resolve(), Path(image_root).resolve()
    try:
        stat = json_path.stat()
        identity = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        identity = None  # validate_coco reports it
    key = (str(json_path), identity, str(image_root), str(cache_dir), sorted(validate_opts.items()))
    if _registered.get(name) == key and name in DatasetCatalog.list():
        return list(MetadataCatalog.get(name).thing_classes)

    report = validate_coco(json_path, image_root, **validate_opts)
    for warning in report.warnings:
        logger.warning(warning)
    json_file = _write_cleaned(report.cleaned, json_path, cache_dir) if report.changed else json_path
    category_ids = sorted(cat["id"] for cat in report.cleaned["categories"])

    DatasetCatalog.pop(name, None)
    MetadataCatalog.pop(name, None)  # Metadata refuses to change a set value, so start afresh
    json_file_s, image_root_s = str(json_file), str(image_root)
    DatasetCatalog.register(name, lambda: load_coco_json(json_file_s, image_root_s, name))
    MetadataCatalog.get(name).set(
        json_file=json_file_s, image_root=image_root_s, evaluator_type="coco",
        thing_classes=list(report.class_names),
        # The same map load_coco_json builds, needed before the first DatasetCatalog.get.
        thing_dataset_id_to_contiguous_id={cid: i for i, cid in enumerate(category_ids)},
    )
    _registered[name] = key
    return list(report.class_names)


def _write_cleaned(cleaned: dict, source: Path, cache_dir: Path | None) -> Path:
    """Write `cleaned` once under a name from its content hash; returns the path."""
    content = json_text(cleaned, sort_keys=True).encode()
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "cleaned"
    target = folder / f"{source.stem}-{hashlib.sha256(content).hexdigest()[:16]}.json"
    if target.is_file():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, lambda f: f.write(content))
    except OSError as e:
        raise DataError(f"cannot write the cleaned copy of {source} to {folder}: {e.strerror or e}",
                        hint="make the lgd cache folder writable (set LGD_CACHE to move it)") from None
    return target


def synthetic_paths() -> SyntheticPaths:
    """Paths of the default synthetic set, generating it on first use."""
    return ensure_synthetic()


def coco_paths(data_root: Path) -> tuple[Path, Path, Path, Path]:
    """The files of COCO 2017 under `data_root`, checked to exist.

    Args:
        data_root: the COCO folder (holding annotations/, train2017/, val2017/), or the folder above it
            holding coco/ (detectron2's DETECTRON2_DATASETS layout).
    Returns:
        (train json, train image folder, val json, val image folder).
    """
    root = Path(data_root)
    if not (root / "annotations").is_dir() and (root / "coco" / "annotations").is_dir():
        root = root / "coco"
    paths = (root / "annotations" / "instances_train2017.json", root / "train2017",
             root / "annotations" / "instances_val2017.json", root / "val2017")
    for path, is_file in zip(paths, (True, False, True, False)):
        if not (path.is_file() if is_file else path.is_dir()):
            raise DataError(f"COCO {'annotation file' if is_file else 'image folder'} not found: {path}",
                            hint=COCO_LAYOUT.format(root=root))
    return paths


def register_config_datasets(cfg, splits=("train", "val")) -> None:
    """Validate and register the config's datasets under lgd's fixed names (in this process)."""
    data = cfg.LGD.DATA
    # The embedded set is generated by us: any fix-up would hide a generator bug.
    bad_boxes = "error" if data.SOURCE == "synthetic" else data.BAD_BOXES
    opts = {"bad_boxes": bad_boxes, "allow_outside_root": bool(data.ALLOW_OUTSIDE_ROOT)}
    if "train" in splits:
        register_coco_json(TRAIN_DATASET, Path(data.TRAIN_JSON), Path(data.TRAIN_IMAGES), **opts)
    if "val" in splits:
        register_coco_json(VAL_DATASET, Path(data.VAL_JSON), Path(data.VAL_IMAGES), **opts)
