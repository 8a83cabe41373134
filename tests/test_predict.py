"""`lgd predict`: drawn PNGs and COCO-result JSON from a real checkpoint; bad images refused before any work."""
import json
from pathlib import Path

import pytest
from PIL import Image

from lgd_cli.engine import predict as engine_predict
from lgd_cli.errors import DataError

from tests.helpers import run_cli


@pytest.fixture
def checkpoint(trained_checkpoint):
    return trained_checkpoint


@pytest.fixture
def images(tiny_data, tmp_path):
    """Two val images, one of them as a 80x48 JPEG in another folder under the same stem."""
    first = sorted(Path(tiny_data.val_images).glob("*.png"))[0]
    other = tmp_path / "other"
    other.mkdir()
    Image.open(first).convert("RGB").resize((80, 48)).save(other / first.with_suffix(".jpg").name)
    return [first, other / first.with_suffix(".jpg").name]


@pytest.mark.slow
def test_one_png_per_image_and_coco_results(checkpoint, images, tmp_path):
    # After 2 iterations every score is about 0.01: threshold 0 keeps the top 100 per image.
    result = engine_predict.predict(checkpoint, images, tmp_path / "out", score_thresh=0.0, device="cpu")
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["000001-1.png", "000001.png"]  # the repeated stem does not overwrite the first
    for (image, png, count), size in zip(result.images, [(64, 64), (80, 48)]):
        assert Image.open(png).size == Image.open(image).size == size and 0 < count <= 100

    detections = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert result.detections_file == tmp_path / "out" / "detections.json"
    assert len(detections) == sum(count for _, _, count in result.images)
    for det in detections:
        assert set(det) == {"image_id", "file_name", "category_id", "bbox", "score"}
        width, height = [(64, 64), (80, 48)][det["image_id"]]
        x, y, w, h = det["bbox"]
        assert det["category_id"] in {1, 2, 3, 4, 5} and 0 < det["score"] <= 1
        # Boxes in the original image's pixels (the second image was resized to 64 px inside).
        assert 0 <= x <= x + w <= width + 0.01 and 0 <= y <= y + h <= height + 0.01 and w >= 0 and h >= 0
    assert {d["file_name"] for d in detections} == {"000001.png", "000001.jpg"}


@pytest.mark.slow
def test_score_threshold_filters(checkpoint, images, tmp_path):
    result = engine_predict.predict(checkpoint, images[:1], tmp_path, score_thresh=0.5, device="cpu")
    assert result.images[0][2] == 0 and json.loads((tmp_path / "detections.json").read_text()) == []
    assert (tmp_path / "000001.png").is_file()  # the image is still drawn, with nothing on it


@pytest.mark.parametrize("bad", ["missing.png", "notes.png", "folder"])
def test_bad_image_is_named_before_any_work(bad, images, tmp_path, monkeypatch):
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "folder").mkdir()
    monkeypatch.setattr(engine_predict, "load_student", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(DataError) as error:
        engine_predict.predict(Path("any.pth"), [images[0], tmp_path / bad], tmp_path / "out")
    assert str(tmp_path / bad) in error.value.message and error.value.exit_code == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_predict(checkpoint, images, tmp_path, capsys):
    assert run_cli("predict", str(checkpoint), str(images[0]), "-o", str(tmp_path / "p"), "--score-thresh", "0",
                   "--device", "cpu") == 0
    out = capsys.readouterr().out
    assert "detections written to" in out and (tmp_path / "p" / "000001.png").is_file()


@pytest.mark.parametrize("args, message, code", [
    (["predict", "any.pth", "missing.png"], "image missing.png does not exist", 1),
    (["predict", "any.pth"], "Missing argument", 2),
    (["predict", "any.pth", "x.png", "--score-thresh", "1.5"], "--score-thresh", 2),
])
def test_cli_predict_bad_input(args, message, code, capsys):
    assert run_cli(*args) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_predict_hands_the_engine_its_arguments(monkeypatch):
    seen = []
    monkeypatch.setattr(engine_predict, "predict", lambda *args, **kwargs: seen.append((args, kwargs)) or "result")
    monkeypatch.setattr("lgd_cli.render.predictions", lambda result: seen.append(result))
    assert run_cli("predict", "ckpt.pth", "a.jpg", "b.png", "--score-thresh", "0.25") == 0
    assert seen == [((Path("ckpt.pth"), [Path("a.jpg"), Path("b.png")], Path("predictions")),
                     {"score_thresh": 0.25, "device": None}), "result"]
