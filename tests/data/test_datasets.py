"""Registration in detectron2's catalogs: round trip, cleaned copies, idempotence, COCOEvaluator agreement."""
import json
import logging
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lgd_cli.data import datasets
from lgd_cli.data.datasets import coco_paths, register_coco_json
from lgd_cli.data.synthetic import CLASS_NAMES, generate
from lgd_cli.errors import DataError

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402  (after lgd's compat shims)
from detectron2.data.datasets import load_coco_json  # noqa: E402
from detectron2.evaluation import COCOEvaluator  # noqa: E402
from detectron2.structures import BoxMode, Boxes, Instances  # noqa: E402


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("shapes") / "set", num_train=12, num_val=8, image_size=64, seed=1)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_round_trip(shapes, cache):
    names = register_coco_json("t_round_trip", shapes.train_json, shapes.train_images, cache_dir=cache)
    assert names == list(CLASS_NAMES)
    records = DatasetCatalog.get("t_round_trip")
    coco = json.loads(shapes.train_json.read_text())
    assert len(records) == 12 and [r["image_id"] for r in records] == [i["id"] for i in coco["images"]]
    assert sum(len(r["annotations"]) for r in records) == len(coco["annotations"])
    assert all((shapes.train_images / r["file_name"]).is_file() for r in records)
    assert {a["category_id"] for r in records for a in r["annotations"]} == set(range(len(CLASS_NAMES)))
    assert all(a["bbox_mode"] == BoxMode.XYWH_ABS and a["segmentation"] for r in records for a in r["annotations"])
    meta = MetadataCatalog.get("t_round_trip")
    assert meta.json_file == str(shapes.train_json.resolve()) and not cache.exists()  # clean: no copy
    assert meta.thing_classes == list(CLASS_NAMES) and meta.evaluator_type == "coco"
    assert meta.thing_dataset_id_to_contiguous_id == {k + 1: k for k in range(len(CLASS_NAMES))}


def test_noncontiguous_category_ids(tmp_path, shapes, cache):
    data = json.loads(shapes.val_json.read_text())
    for cat in data["categories"]:
        cat["id"] *= 10
    for ann in data["annotations"]:
        ann["category_id"] *= 10
    (tmp_path / "val.json").write_text(json.dumps(data))
    register_coco_json("t_sparse_ids", tmp_path / "val.json", shapes.val_images, cache_dir=cache)
    id_map = MetadataCatalog.get("t_sparse_ids").thing_dataset_id_to_contiguous_id
    assert id_map == {10 * (k + 1): k for k in range(len(CLASS_NAMES))}
    DatasetCatalog.get("t_sparse_ids")  # load_coco_json sets the same metadata: no conflict
    assert MetadataCatalog.get("t_sparse_ids").thing_dataset_id_to_contiguous_id == id_map


def test_evaluator_scores_ground_truth_as_perfect(shapes, cache):
    # json_file, thing_classes and the id map agree: ground truth submitted as predictions gets AP 100.
    register_coco_json("t_eval", shapes.val_json, shapes.val_images, cache_dir=cache)
    evaluator = COCOEvaluator("t_eval", tasks=("bbox",), distributed=False, use_fast_impl=False)
    evaluator.reset()
    for record in DatasetCatalog.get("t_eval"):
        anns = record["annotations"]
        instances = Instances((record["height"], record["width"]))
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        instances.pred_boxes = Boxes(BoxMode.convert(boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS))
        instances.scores = torch.ones(len(anns))
        instances.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        evaluator.process([record], [{"instances": instances}])
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100.0)


def test_cleaned_copy_is_what_is_trained_and_evaluated(tmp_path, shapes, cache, caplog):
    data = json.loads(shapes.train_json.read_text())
    data["annotations"][0]["bbox"] = [50.0, 50.0, 30.0, 30.0]  # past the 64 px image edge
    data["annotations"][1]["bbox"][2] = 0  # no width: dropped
    (tmp_path / "train.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        register_coco_json("t_cleaned", tmp_path / "train.json", shapes.train_images, cache_dir=cache)
    assert "1 boxes clipped to their image, 1 dropped" in caplog.text
    json_file = MetadataCatalog.get("t_cleaned").json_file
    assert json_file.startswith(str(cache)) and json_file != str(tmp_path / "train.json")
    cleaned = json.loads(open(json_file).read())
    assert cleaned["annotations"][0]["bbox"] == [50.0, 50.0, 14.0, 14.0]
    assert len(cleaned["annotations"]) == len(data["annotations"]) - 1
    first = next(a for r in DatasetCatalog.get("t_cleaned") for a in r["annotations"])
    assert first["bbox"] == [50.0, 50.0, 14.0, 14.0]
    # The same content is written once.
    register_coco_json("t_cleaned_again", tmp_path / "train.json", shapes.train_images, cache_dir=cache)
    assert MetadataCatalog.get("t_cleaned_again").json_file == json_file and len(list(cache.iterdir())) == 1


def test_same_files_is_a_no_op_and_other_files_replace(tmp_path, shapes, cache, monkeypatch):
    register_coco_json("t_idem", shapes.train_json, shapes.train_images, cache_dir=cache)
    loader = DatasetCatalog["t_idem"]
    monkeypatch.setattr(datasets, "validate_coco", lambda *a, **k: pytest.fail("validated again"))
    assert register_coco_json("t_idem", shapes.train_json, shapes.train_images, cache_dir=cache) == list(CLASS_NAMES)
    assert DatasetCatalog["t_idem"] is loader
    monkeypatch.undo()

    data = json.loads(shapes.val_json.read_text())
    data["categories"] = [{**c, "name": c["name"].upper()} for c in data["categories"]]
    (tmp_path / "other.json").write_text(json.dumps(data))
    names = register_coco_json("t_idem", tmp_path / "other.json", shapes.val_images, cache_dir=cache)
    assert names == [n.upper() for n in CLASS_NAMES] == MetadataCatalog.get("t_idem").thing_classes
    assert len(DatasetCatalog.get("t_idem")) == 8


def test_failed_registration_keeps_the_previous_one(tmp_path, shapes, cache):
    register_coco_json("t_keep", shapes.train_json, shapes.train_images, cache_dir=cache)
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        register_coco_json("t_keep", tmp_path / "broken.json", shapes.train_images, cache_dir=cache)
    assert len(DatasetCatalog.get("t_keep")) == 12


def _coco_layout(root):
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / split).mkdir()
        (root / "annotations" / f"instances_{split}.json").write_text("{}")


def test_coco_paths(tmp_path):
    _coco_layout(tmp_path / "datasets" / "coco")
    expected = (tmp_path / "datasets/coco/annotations/instances_train2017.json", tmp_path / "datasets/coco/train2017",
                tmp_path / "datasets/coco/annotations/instances_val2017.json", tmp_path / "datasets/coco/val2017")
    assert coco_paths(tmp_path / "datasets" / "coco") == expected
    assert coco_paths(tmp_path / "datasets") == expected  # detectron2's DETECTRON2_DATASETS folder


def test_coco_paths_names_what_is_missing(tmp_path):
    _coco_layout(tmp_path / "coco")
    shutil.rmtree(tmp_path / "coco" / "val2017")
    with pytest.raises(DataError, match=f"image folder not found: {tmp_path}/coco/val2017") as info:
        coco_paths(tmp_path / "coco")
    assert "annotations/instances_train2017.json" in info.value.hint
    with pytest.raises(DataError, match="annotation file not found: .*nowhere/annotations/instances_train2017.json"):
        coco_paths(tmp_path / "nowhere")


# What validate_coco accepts, detectron2's loader and pycocotools must load without error.
_VALUES = st.sampled_from([None, 0, -3, 1.5, 1e9, "x", [], {}, [1, 2], [[1, 2, 3, 4, 5, 6]], True])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(draw=st.data())
def test_fuzz_accepted_data_loads_in_detectron2(shapes, tmp_path_factory, draw):
    data = json.loads(shapes.val_json.read_text())
    for _ in range(draw.draw(st.integers(1, 3))):
        ann = draw.draw(st.sampled_from(data["annotations"]))
        key = draw.draw(st.sampled_from(["bbox", "area", "iscrowd", "segmentation", "keypoints", "ignore"]))
        ann[key] = draw.draw(_VALUES | st.lists(st.floats(-100, 200), min_size=4, max_size=4))
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "val.json").write_text(json.dumps(data))
    try:
        register_coco_json("t_fuzz", folder / "val.json", shapes.val_images, cache_dir=folder / "cache")
    except DataError:
        return
    records = DatasetCatalog.get("t_fuzz")
    assert sum(len(r["annotations"]) for r in records) == len(
        json.loads(open(MetadataCatalog.get("t_fuzz").json_file).read())["annotations"])
    load_coco_json(MetadataCatalog.get("t_fuzz").json_file, str(shapes.val_images))
