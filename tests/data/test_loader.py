"""The resumable training stream: same batches for any worker count, continued exactly from its state."""
import io
import itertools

import numpy as np
import pytest
import torch
from detectron2.data.samplers import TrainingSampler

from lgd_cli.data.loader import ResumableTrainLoader
from lgd_cli.errors import DataError


def _records(n=10, landscape=(1, 4, 5, 8)):
    return [{"image_id": i, "file_name": f"img{i}.png", "width": 30 if i in landscape else 20,
             "height": 20 if i in landscape else 30} for i in range(n)]


def _random_mapper(record):
    """Stands for DatasetMapper: random augmentation from the global numpy and torch RNGs."""
    return {**record, "flip": float(np.random.uniform()), "noise": float(torch.rand(1))}


def _loader(records=None, mapper=_random_mapper, workers=0, **kw):
    records = records or _records()
    return ResumableTrainLoader(records, mapper, TrainingSampler(len(records), seed=5), batch_size=3,
                                aspect_ratio_grouping=True, num_workers=workers, seed=11, **kw)


def _take(loader, n):
    return [[(d["image_id"], d["flip"], d["noise"]) for d in batch] for batch in itertools.islice(loader, n)]


def test_batches_do_not_depend_on_the_worker_count_nor_touch_global_rngs():
    np.random.seed(0)
    before = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    single = _take(_loader(workers=0), 6)
    assert np.array_equal(np.random.get_state()[1], before[0]) and torch.equal(torch.get_rng_state(), before[1])
    assert _take(_loader(workers=2), 6) == single
    # Aspect-ratio grouping: each batch holds one orientation only.
    landscape = {1, 4, 5, 8}
    assert all(len({i in landscape for i, _, _ in batch}) == 1 for batch in single)


def test_state_continues_the_same_stream_buckets_included():
    whole = _take(_loader(), 9)
    first = _loader()
    head = _take(first, 4)
    state = first.state_dict()
    assert any(state["buckets"])  # samples wait in a bucket: they must come back, mapped the same
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = _loader()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert head + _take(resumed, 5) == whole


def _failing_mapper(record):
    if record["image_id"] == 3:
        raise OSError("image file is truncated")
    return _random_mapper(record)


@pytest.fixture
def bad_image(tmp_path):
    """img3.png is half a PNG; the other records' files do not matter to the fake mapper."""
    from PIL import Image

    path = tmp_path / "img3.png"
    Image.new("RGB", (20, 30)).save(path)
    path.write_bytes(path.read_bytes()[:40])
    records = _records()
    records[3]["file_name"] = str(path)
    return records


def test_undecodable_image_is_an_error_naming_file_and_record(bad_image):
    with pytest.raises(DataError) as info:
        _take(_loader(bad_image, _failing_mapper, json_file="ann.json"), 9)
    assert f"image {bad_image[3]['file_name']} (image id 3 in ann.json)" in info.value.message
    assert "--skip-bad-images" in info.value.hint


def test_skip_bad_images_warns_once_and_keeps_batches_full(bad_image, caplog):
    loader = _loader(bad_image, _failing_mapper, skip_bad_images=True)
    batches = _take(loader, 9)
    assert all(len(b) == 3 for b in batches) and 3 not in {i for b in batches for i, _, _ in b}
    assert loader.skipped[bad_image[3]["file_name"]] >= 2  # seen again every epoch, counted
    warned = [r for r in caplog.records if r.name == "lgd_cli" and r.levelname == "WARNING"]
    assert sum("skipped: image" in r.getMessage() for r in warned) == 1


def test_all_images_bad_is_an_error_not_a_hang(tmp_path):
    records = _records(3)
    for r in records:
        (tmp_path / r["file_name"]).write_bytes(b"not an image")
        r["file_name"] = str(tmp_path / r["file_name"])

    def always_fails(record):
        raise OSError("broken")

    with pytest.raises(DataError, match="none of the 3 training images can be decoded"):
        _take(_loader(records, always_fails, skip_bad_images=True), 1)


def test_a_mapper_bug_is_not_mistaken_for_a_bad_image(tmp_path):
    from PIL import Image

    records = _records(3)
    for r in records:
        Image.new("RGB", (r["width"], r["height"])).save(tmp_path / r["file_name"])
        r["file_name"] = str(tmp_path / r["file_name"])

    def buggy(record):
        raise KeyError("annotations")

    with pytest.raises(KeyError):
        _take(_loader(records, buggy, skip_bad_images=True), 1)
