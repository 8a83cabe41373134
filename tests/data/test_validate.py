"""validate_coco: each malformed input is one DataError naming the file and the record; nothing else escapes."""
import copy
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lgd_cli.data.validate import read_class_names, validate_coco
from lgd_cli.errors import ConfigError, DataError


def _dataset() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 80},
                   {"id": 2, "file_name": "b.png", "width": 50, "height": 50}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 2, "bbox": [10, 10, 20, 30], "area": 600, "iscrowd": 0,
             "segmentation": [[10, 10, 30, 10, 30, 40]]},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [5.5, 6, 7, 8], "area": 56, "iscrowd": 1,
             "segmentation": {"size": [80, 100], "counts": [10, 20, 7970]}},
        ],
        "categories": [{"id": 2, "name": "square"}, {"id": 1, "name": "circle"}],
    }


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "images" / name).write_bytes(b"")
    return tmp_path


def _write(root: Path, data) -> Path:
    path = root / "ann.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def _fails(root: Path, data, *fragments, **opts) -> DataError:
    path = _write(root, data)
    with pytest.raises(DataError) as info:
        validate_coco(path, root / "images", **opts)
    assert str(path) in info.value.message and info.value.hint
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message
    return info.value


def test_valid_dataset_passes_unchanged(root):
    report = validate_coco(_write(root, _dataset()), root / "images", bad_boxes="error")
    assert (report.num_images, report.num_annotations) == (2, 3)
    assert report.class_names == ["circle", "square"]  # category-id order, not file order
    assert not report.changed and report.cleaned["annotations"] == _dataset()["annotations"]
    assert read_class_names(root / "ann.json") == ["circle", "square"]


def test_missing_file(root):
    with pytest.raises(DataError, match="not found: .*nope.json"):
        validate_coco(root / "nope.json", root / "images")


def test_unreadable_file(root):
    with pytest.raises(DataError, match=f"cannot read annotation file {root}"):
        validate_coco(root, root / "images")  # a folder


def test_malformed_json_gives_line_and_column(root):
    _fails(root, '{"images": [\n  {"id": 1,,}\n]}', "line 2, column 12")


def test_not_utf8(root):
    (root / "ann.json").write_bytes(b'{"images": "\xff\xfe\xfa"}')
    with pytest.raises(DataError, match="not valid JSON"):
        validate_coco(root / "ann.json", root / "images")


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_list(root, key):
    data = _dataset()
    del data[key]
    _fails(root, data, "top level", f'"{key}" is missing')


def test_not_coco(root):
    _fails(root, [1, 2], "top level: must be a JSON object")
    _fails(root, {**_dataset(), "images": {"1": "a.png"}}, "images: must be a list")


def test_empty_dataset(root):
    _fails(root, {**_dataset(), "images": [], "annotations": []}, "images: is empty")
    _fails(root, {**_dataset(), "categories": []}, "categories: is empty")


@pytest.mark.parametrize("key, record", [("images", "images[1] (id 1)"), ("annotations", "annotations[1] (id 1)"),
                                         ("categories", "categories[1] (id 2)")])
def test_duplicate_ids(root, key, record):
    data = _dataset()
    data[key][1]["id"] = data[key][0]["id"]
    _fails(root, data, f"{record}: duplicate", "also " + key + "[0]")


def test_unknown_image_and_category(root):
    data = _dataset()
    data["annotations"][2]["image_id"] = 9
    _fails(root, data, "annotations[2] (id 3): image_id 9 is not in images")
    data = _dataset()
    data["annotations"][0]["category_id"] = 7
    _fails(root, data, "annotations[0] (id 1): category_id 7 is not in categories")


def test_zero_width_box(root):
    data = _dataset()
    data["annotations"][1]["id"] = 57
    data["annotations"][1]["bbox"][2] = 0
    _fails(root, data, "annotations[1] (id 57): bbox width is 0", bad_boxes="error")
    report = validate_coco(root / "ann.json", root / "images", bad_boxes="clip")
    assert (report.num_dropped, report.num_annotations) == (1, 2) and report.changed


def test_box_outside_image_by_policy(root):
    data = _dataset()
    data["annotations"][0]["bbox"] = [90, -5, 20, 30]  # image 1 is 100x80
    _fails(root, data, "annotations[0] (id 1): bbox [90, -5, 20, 30] extends outside its 100x80 image",
           bad_boxes="error")
    clipped = validate_coco(root / "ann.json", root / "images", bad_boxes="clip")
    assert (clipped.num_clipped, clipped.num_dropped) == (1, 0) and clipped.changed
    assert clipped.cleaned["annotations"][0]["bbox"] == [90, 0, 10, 25]
    assert clipped.cleaned["annotations"][0]["area"] == 250  # no more than what is left of the box
    dropped = validate_coco(root / "ann.json", root / "images", bad_boxes="drop")
    assert (dropped.num_clipped, dropped.num_dropped, dropped.num_annotations) == (0, 1, 2)
    assert [a["id"] for a in dropped.cleaned["annotations"]] == [2, 3]


def test_box_wholly_outside_is_dropped_when_clipping(root):
    data = _dataset()
    data["annotations"][0]["bbox"] = [120, 10, 20, 30]
    report = validate_coco(_write(root, data), root / "images")
    assert (report.num_clipped, report.num_dropped) == (0, 1)


def test_rounding_overshoot_is_left_alone(root):
    data = _dataset()
    data["annotations"][1]["bbox"] = [-0.3, 0, 50.4, 50.2]
    report = validate_coco(_write(root, data), root / "images", bad_boxes="error")
    assert not report.changed and report.cleaned["annotations"][1]["bbox"] == [-0.3, 0, 50.4, 50.2]


def test_short_polygon(root):
    data = _dataset()
    data["annotations"][0]["segmentation"] = [[10, 10, 30, 10, 30, 40], [1, 2, 3, 4]]
    _fails(root, data, "annotations[0] (id 1).segmentation[1]: a polygon needs at least 3")


def test_bad_rle(root):
    data = _dataset()
    data["annotations"][2]["segmentation"]["size"] = [50, 50]
    _fails(root, data, "annotations[2] (id 3).segmentation: RLE size [50, 50]")


def test_string_for_a_number(root):
    data = _dataset()
    data["annotations"][1]["bbox"][3] = "50"
    _fails(root, data, "annotations[1] (id 2).bbox[3]: must be a number, got '50'")
    data = _dataset()
    data["images"][0]["width"] = None
    _fails(root, data, "images[0] (id 1).width: must be an integer")


def test_non_finite_number(root):
    data = _dataset()
    data["annotations"][0]["area"] = math.nan
    _fails(root, data, "annotations[0] (id 1).area: must be a finite number")


def test_ignore_flag_is_refused(root):
    data = _dataset()
    data["annotations"][0]["ignore"] = 1
    _fails(root, data, "annotations[0] (id 1).ignore")


def test_missing_images_listed_up_front(root):
    data = _dataset()
    data["images"] += [{"id": 10 + k, "file_name": f"gone{k}.png", "width": 9, "height": 9} for k in range(12)]
    error = _fails(root, data, "12 of 14 image files are missing", "gone0.png", "gone9.png", "and 2 more")
    assert "gone10.png" not in error.message
    assert validate_coco(root / "ann.json", root / "images", check_images=False).num_images == 14


def test_missing_image_folder(root):
    with pytest.raises(DataError, match="image folder not found: .*elsewhere"):
        validate_coco(_write(root, _dataset()), root / "elsewhere")


@pytest.mark.parametrize("name", ["../a.png", "sub/../../a.png", "/etc/passwd"])
def test_file_name_outside_root_is_refused(root, name):
    data = _dataset()
    data["images"][0]["file_name"] = name
    _fails(root, data, "images[0] (id 1).file_name", "outside the image folder", check_images=False)
    validate_coco(root / "ann.json", root / "images", allow_outside_root=True, check_images=False)


def test_missing_area_and_iscrowd_are_filled(root):
    data = _dataset()
    del data["annotations"][1]["area"], data["annotations"][1]["iscrowd"]
    report = validate_coco(_write(root, data), root / "images")
    assert report.num_filled == 1 and report.changed
    assert report.cleaned["annotations"][1]["area"] == 2500 and report.cleaned["annotations"][1]["iscrowd"] == 0


def test_unknown_policy_is_a_config_error(root):
    with pytest.raises(ConfigError, match="bad_boxes"):
        validate_coco(_write(root, _dataset()), root / "images", bad_boxes="ignore")


# Fuzz: any mutation of a valid dataset either validates or raises DataError, never anything else.
_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats() | st.text(max_size=6)
    | st.sampled_from([0, -1, 1e308, 2**63, "\ud800", "\0", "../x.png", "/abs.png", "ü" * 200, [], {}]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def _slots(node, out):
    """Every (container, key) in `node`, so a mutation can reach any depth."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        out.append((node, key))
        _slots(child, out)
    return out


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "images").mkdir()
    for name in ("a.png", "b.png"):
        (root / "images" / name).write_bytes(b"")
    return root


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(draw=st.data(), policy=st.sampled_from(["clip", "drop", "error"]))
def test_fuzz_only_data_errors(fuzz_root, draw, policy):
    data = copy.deepcopy(_dataset())
    for _ in range(draw.draw(st.integers(1, 3))):
        container, key = draw.draw(st.sampled_from(_slots(data, [])))
        action = draw.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace" or (action == "delete" and isinstance(container, list)):
            container[key] = draw.draw(_JUNK)
        elif action == "delete":
            del container[key]
        elif isinstance(container, dict):
            container[draw.draw(st.text(max_size=4))] = draw.draw(_JUNK)
        else:
            container.append(draw.draw(_JUNK))
    path = fuzz_root / "ann.json"
    path.write_text(json.dumps(data))
    try:
        report = validate_coco(path, fuzz_root / "images", bad_boxes=policy)
    except DataError as e:
        assert str(path) in e.message and e.hint
        return
    for ann in report.cleaned["annotations"]:  # what passes is safe to train on
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and ann["area"] >= 0 and ann["iscrowd"] in (0, 1)
    json.dumps(report.cleaned)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, len(json.dumps(_dataset())) - 1))
def test_fuzz_truncated_file(fuzz_root, cut):
    path = fuzz_root / "cut.json"
    path.write_text(json.dumps(_dataset())[:cut])
    with pytest.raises(DataError, match=f"{path}: not valid JSON at line 1, column"):
        validate_coco(path, fuzz_root / "images")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.text(min_size=1, max_size=12), min_size=2, max_size=2),
       number=st.sampled_from([-1, 0, -(2**63) - 1, 2**63, 2**31, 10**30, 1.5, -0.0, float("inf"), True]),
       field=st.sampled_from(["images.0.id", "images.0.width", "annotations.0.image_id", "annotations.0.category_id",
                              "annotations.0.bbox.2", "annotations.0.area", "categories.0.id"]))
def test_fuzz_unicode_names_and_extreme_numbers(fuzz_root, names, number, field):
    """Any non-blank unicode class name round-trips; a blank one, or an out-of-range number, is a DataError."""
    data = copy.deepcopy(_dataset())
    data["categories"][0]["name"], data["categories"][1]["name"] = names
    path = fuzz_root / "names.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    if any(not n.strip() for n in names):
        with pytest.raises(DataError, match=r"categories\[\d\] \(id \d\)\.name: must be a non-empty string"):
            validate_coco(path, fuzz_root / "images")
    else:
        assert validate_coco(path, fuzz_root / "images").class_names == [names[1], names[0]]  # id order
    container = data
    *parts, last = field.split(".")
    for part in parts:
        container = container[int(part)] if part.isdigit() else container[part]
    container[int(last) if last.isdigit() else last] = number
    data["categories"][0]["name"], data["categories"][1]["name"] = "a", "b"
    path.write_text(json.dumps(data))
    try:
        report = validate_coco(path, fuzz_root / "images", bad_boxes="error")
    except DataError as e:
        assert str(path) in e.message and e.hint
        return
    # What passes is a finite number, never a bool; ids and sizes are integers in range.
    assert not isinstance(number, bool) and math.isfinite(number)
    if field.endswith(("id", "width")):
        assert isinstance(number, int) and -(2**63) <= number < 2**63
    assert report.num_images == 2 and all(a["bbox"][2] > 0 for a in report.cleaned["annotations"])
