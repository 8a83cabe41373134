"""The synthetic shapes set: deterministic, well-formed COCO, the edge cases present, written atomically."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lgd_cli.data import synthetic
from lgd_cli.data.synthetic import CLASS_NAMES, ensure_synthetic, generate
from lgd_cli.data.validate import validate_coco
from lgd_cli.errors import ConfigError, DataError


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("shapes") / "set", num_train=60, num_val=20, image_size=96, seed=3)


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_same_arguments_give_identical_bytes(tmp_path, shapes):
    again = generate(tmp_path / "again", num_train=60, num_val=20, image_size=96, seed=3)
    first = _digest(shapes.train_json.parent.parent)
    assert first == _digest(again.train_json.parent.parent)
    assert len(first) == 60 + 20 + 2 + 1  # images, two jsons, the marker


def test_another_seed_gives_other_images(tmp_path, shapes):
    other = generate(tmp_path / "other", num_train=60, num_val=20, image_size=96, seed=4)
    assert other.train_json.read_bytes() != shapes.train_json.read_bytes()


def test_smaller_set_is_a_prefix(tmp_path, shapes):
    small = generate(tmp_path / "small", num_train=5, num_val=1, image_size=96, seed=3)
    for name in ("000001.png", "000005.png"):
        assert (small.train_images / name).read_bytes() == (shapes.train_images / name).read_bytes()


def test_counts_categories_and_images(shapes):
    train, val = _load(shapes.train_json), _load(shapes.val_json)
    assert (len(train["images"]), len(val["images"])) == (60, 20)
    assert [c["id"] for c in train["categories"]] == list(range(1, len(CLASS_NAMES) + 1))
    assert tuple(c["name"] for c in train["categories"]) == CLASS_NAMES == shapes.class_names
    assert len({a["id"] for a in train["annotations"]}) == len(train["annotations"])
    for img in train["images"]:
        with Image.open(shapes.train_images / img["file_name"]) as im:
            assert im.size == (img["width"], img["height"]) == (96, 96) and im.mode == "RGB"


def test_boxes_inside_images_and_polygons_inside_boxes(shapes):
    for ann in _load(shapes.train_json)["annotations"] + _load(shapes.val_json)["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 96 + 1e-6 and y + h <= 96 + 1e-6
        assert w > 0 and h > 0 and ann["iscrowd"] == 0
        (poly,) = ann["segmentation"]
        assert len(poly) >= 6 and len(poly) % 2 == 0
        xs, ys = np.array(poly[0::2]), np.array(poly[1::2])
        assert xs.min() >= x - 1e-6 and xs.max() <= x + w + 1e-6
        assert ys.min() >= y - 1e-6 and ys.max() <= y + h + 1e-6
        assert 0 < ann["area"] <= w * h + 1e-6


def test_sizes_empty_images_and_every_class(shapes):
    data = _load(shapes.train_json)
    with_objects = {a["image_id"] for a in data["annotations"]}
    empty = [img["id"] for img in data["images"] if img["id"] not in with_objects]
    assert len(empty) == 60 // synthetic.EMPTY_EVERY  # 5%
    assert {a["category_id"] for a in data["annotations"]} == set(range(1, len(CLASS_NAMES) + 1))
    sides = [max(a["bbox"][2:]) for a in data["annotations"]]
    assert 96 * 0.06 < min(sides) and max(sides) <= 96 * synthetic.SIZE_RANGE[1]


def test_shapes_are_drawn_where_annotated(shapes):
    # The pixels inside a lone object's polygon differ from the background around it.
    data = _load(shapes.train_json)
    ann = next(a for a in data["annotations"] if a["area"] > 300)
    img = data["images"][ann["image_id"] - 1]
    pixels = np.asarray(Image.open(shapes.train_images / img["file_name"]), np.float64)
    x, y, w, h = ann["bbox"]
    cx, cy = int(x + w / 2), int(y + h / 2)
    assert pixels[cy - 1:cy + 2, cx - 1:cx + 2].std(axis=(0, 1)).max() < 40  # one flat colour plus noise


def test_output_is_valid_coco(shapes):
    for js, root in ((shapes.train_json, shapes.train_images), (shapes.val_json, shapes.val_images)):
        report = validate_coco(js, root, bad_boxes="error")
        assert not report.changed and report.class_names == list(CLASS_NAMES)


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "set", num_train=3, num_val=1)
    assert list(tmp_path.iterdir()) == []


def test_generate_replaces_an_older_set(tmp_path):
    generate(tmp_path / "set", num_train=2, num_val=1)
    paths = generate(tmp_path / "set", num_train=4, num_val=1)
    assert len(_load(paths.train_json)["images"]) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["set"]


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not an lgd synthetic dataset"):
        generate(tmp_path / "mine", num_train=2, num_val=1)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_ensure_synthetic_generates_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "DEFAULT_SIZES", {"num_train": 4, "num_val": 2, "image_size": 64, "seed": 0})
    monkeypatch.setenv("LGD_CACHE", str(tmp_path))
    paths = ensure_synthetic()
    assert paths.train_json == tmp_path / "synthetic-v1" / "annotations" / "instances_train.json"
    assert len(_load(paths.train_json)["images"]) == 4

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a complete set")

    monkeypatch.setattr(synthetic, "_build", fail)
    assert ensure_synthetic() == paths


def test_ensure_synthetic_regenerates_an_incomplete_set(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "DEFAULT_SIZES", {"num_train": 3, "num_val": 1, "image_size": 64, "seed": 0})
    generate(tmp_path / "set", num_train=1, num_val=1, image_size=64)  # other sizes: marker mismatch
    (tmp_path / "set" / synthetic.MARKER).write_text("{")  # and a damaged marker
    paths = ensure_synthetic(tmp_path / "set")
    assert len(_load(paths.train_json)["images"]) == 3


@pytest.mark.parametrize("sizes", [{"num_train": 0}, {"num_val": -1}, {"image_size": 8}])
def test_refuses_degenerate_sizes(tmp_path, sizes):
    with pytest.raises(ConfigError, match="at least 1 image per split"):
        generate(tmp_path / "set", **sizes)
    assert not (tmp_path / "set").exists()
