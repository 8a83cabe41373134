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
    for (image, png, count, best), size in zip(result.images, [(64, 64), (80, 48)]):
        # Drawn enlarged to a 512-px long side, so that labels fit.
        scale = 512 / max(size)
        assert Image.open(image).size == size and 0 < count <= 100 and 0 < best <= 1
        assert all(abs(d - s * scale) <= 1 for d, s in zip(Image.open(png).size, size))

    detections = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert result.detections_file == tmp_path / "out" / "detections.json"
    assert len(detections) == sum(row.detections for row in result.images)
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
    assert 0 < result.images[0].best_score < 0.5  # below the threshold
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
    assert seen == [((Path("ckpt.pth"), ["a.jpg", "b.png"], Path("predictions")),
                     {"score_thresh": 0.25, "device": None, "annotations": None}), "result"]


def test_folders_and_patterns_stand_for_their_image_files(tmp_path):
    for name in ("b.png", "a.jpg", "c.JPEG", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.png").write_bytes(b"")
    expand = engine_predict.expand_images
    assert expand([tmp_path]) == [tmp_path / "a.jpg", tmp_path / "b.png", tmp_path / "c.JPEG"]
    assert expand([str(tmp_path / "*.png"), tmp_path / "sub"]) == [tmp_path / "b.png", tmp_path / "sub" / "d.png"]
    assert expand([str(tmp_path / "**" / "*.png")]) == [tmp_path / "b.png", tmp_path / "sub" / "d.png"]
    assert expand([tmp_path / "notes.txt"]) == [tmp_path / "notes.txt"]  # a file is what it is (check_images judges)
    with pytest.raises(DataError, match=r"no file matches .*\*\.gif"):
        expand([str(tmp_path / "*.gif")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="folder .*empty holds no image files"):
        expand([tmp_path / "empty"])


@pytest.mark.parametrize("best, suggested", [(0.31, 0.3), (0.3, 0.2), (0.0123, 0.01), (0.01, 0.009), (0.95, 0.9)])
def test_suggested_threshold_is_round_and_below_the_best_score(best, suggested):
    assert engine_predict.suggested_threshold(best) == pytest.approx(suggested)


def test_nothing_above_the_threshold_is_said_with_the_best_score(capsys, tmp_path):
    from lgd_cli import render

    rows = [engine_predict.PredictedImage(Path(f"{i}.png"), tmp_path / f"{i}.png", 0, best)
            for i, best in enumerate([0.31, 0.12, None])]
    render.predictions(engine_predict.PredictResult(rows, tmp_path / "detections.json", 0.5))
    out = capsys.readouterr().out.replace("\n", " ")
    assert "no detection above 0.5 in 3 images; the best score was 0.31: try --score-thresh 0.3" in out
    rows[0] = engine_predict.PredictedImage(Path("0.png"), tmp_path / "0.png", 2, 0.9)
    render.predictions(engine_predict.PredictResult(rows, tmp_path / "detections.json", 0.5))
    out = capsys.readouterr().out.replace("\n", " ")
    assert "no detection above 0.5 in 2 of 3 images; the best score was 0.12: try --score-thresh 0.1" in out


def test_image_ids_come_from_the_annotations(tiny_data, tmp_path, monkeypatch):
    val = sorted(Path(tiny_data.val_images).glob("*.png"))
    listed = {img["file_name"]: img["id"] for img in json.loads(Path(tiny_data.val_json).read_text())["images"]}
    assert engine_predict.image_ids_from(tiny_data.val_json, val[::-1]) == [listed[p.name] for p in val[::-1]]
    stranger = tmp_path / "stranger.png"
    Image.open(val[0]).save(stranger)
    monkeypatch.setattr(engine_predict, "load_student", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(DataError) as error:
        engine_predict.predict(Path("any.pth"), [val[0], stranger], tmp_path / "out", annotations=tiny_data.val_json)
    assert error.value.message == f"image {stranger} is not in {tiny_data.val_json} (no images[].file_name matches it)"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_predict_a_folder_with_annotation_ids(checkpoint, tiny_data, tmp_path, capsys):
    assert run_cli("predict", str(checkpoint.parent), str(tiny_data.val_images), "--data", str(tiny_data.val_json),
                   "-o", str(tmp_path / "p"), "--score-thresh", "0.99", "--device", "cpu") == 0
    out = capsys.readouterr().out.replace("\n", " ")
    assert "no detection above 0.99 in 4 images; the best score was" in out and "try --score-thresh" in out
    assert sorted(p.name for p in (tmp_path / "p").glob("*.png")) == sorted(p.name for p in tiny_data.val_images.glob("*.png"))
