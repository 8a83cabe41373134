"""Comparing exported with eager detections, the sidecar, a failed check, and ONNX without onnxruntime."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lgd_cli.errors import LGDError
from lgd_cli.export import export_checkpoint, verify


def dets(boxes, scores, classes):
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(scores, dtype=torch.float32),
            torch.tensor(classes, dtype=torch.int64))


EAGER = dets([[10, 10, 50, 50], [60, 5, 90, 40], [0, 0, 20, 30]], [0.9, 0.7, 0.3], [0, 1, 0])


def compare(exported, eager=EAGER, score_thresh=0.05, max_detections=100):
    return verify.compare([eager], [exported], score_thresh=score_thresh, max_detections=max_detections,
                          sizes=[[64, 96]])


def test_identical_detections_agree():
    c = compare(EAGER)
    assert c.ok and c.max_box_diff == 0 and c.unmatched == 0 and c.num_eager == c.num_exported == [3]


def test_float_noise_within_tolerance_agrees_and_is_measured():
    boxes, scores, classes = EAGER
    c = compare((boxes + 3e-5, scores - 2e-7, classes))
    assert c.ok and c.max_box_diff == pytest.approx(3e-5, rel=0.05) and c.max_score_diff == pytest.approx(2e-7, rel=0.2)


def test_order_of_equal_scores_does_not_matter():
    tied = dets([[10, 10, 50, 50], [60, 5, 90, 40]], [0.5, 0.5], [0, 1])
    swapped = dets([[60, 5, 90, 40], [10, 10, 50, 50]], [0.5, 0.5], [1, 0])
    assert compare(swapped, eager=tied).ok


def test_box_tolerance_is_absolute_plus_relative():
    boxes, scores, classes = EAGER
    assert not compare((boxes + 2e-3, scores, classes)).ok  # 2e-3 px > 1e-3 + 1e-5 * 90
    big = dets([[1000, 1000, 1300, 1300]], [0.9], [0])
    assert compare((big[0] + 1e-2, big[1], big[2]), eager=big).ok  # 1e-2 <= 1e-3 + 1e-5 * 1300
    assert not compare((big[0] + 2e-2, big[1], big[2]), eager=big).ok


@pytest.mark.parametrize("change", ["score", "class", "missing", "extra"])
def test_real_differences_fail(change):
    boxes, scores, classes = (t.clone() for t in EAGER)
    if change == "score":
        scores[1] += 1e-3
    elif change == "class":
        classes[0] = 2
    elif change == "missing":
        boxes, scores, classes = boxes[:2], scores[:2], classes[:2]
    else:
        boxes, scores, classes = torch.cat([boxes, boxes[:1] + 5]), torch.cat([scores, scores[:1] - 0.4]), torch.cat([classes, classes[:1]])
    c = compare((boxes, scores, classes))
    assert not c.ok and c.unmatched > c.borderline


def test_detection_at_a_cut_may_come_and_go():
    # Score threshold: a detection scoring within SCORE_ATOL of it may be kept on one side only.
    at_threshold = dets([[10, 10, 50, 50], [0, 0, 20, 30]], [0.9, 0.05 + 2e-5], [0, 0])
    c = compare(dets([[10, 10, 50, 50]], [0.9], [0]), eager=at_threshold)
    assert c.ok and c.unmatched == c.borderline == 1
    # Top-k: both outputs full, their last detections swapped for near-equal ones.
    eager = dets([[10, 10, 50, 50], [0, 0, 20, 30]], [0.9, 0.40001], [0, 0])
    exported = dets([[10, 10, 50, 50], [70, 0, 90, 30]], [0.9, 0.40002], [0, 1])
    assert compare(exported, eager=eager, max_detections=2).ok
    assert not compare(exported, eager=eager, max_detections=3).ok  # not full: no cut there


def test_no_detections_on_either_side_agree():
    empty = dets([], [], [])
    assert compare(empty, eager=empty).ok
    assert not compare(empty).ok


def test_sample_image_falls_back_to_deterministic_noise(tiny_cfg, tmp_path):
    image, source = verify.sample_image(tiny_cfg)
    assert source.endswith("000001.png") and image.dtype == np.uint8 and image.shape == (64, 64, 3)
    cfg = tiny_cfg.clone()
    cfg.defrost()
    cfg.LGD.DATA.VAL_JSON = str(tmp_path / "gone.json")
    first, source = verify.sample_image(cfg)
    again, _ = verify.sample_image(cfg)
    assert "synthetic" in source and np.array_equal(first, again) and first.shape == (64, 85, 3)


def test_second_sample_input_has_another_padded_size(tiny_cfg):
    image, _ = verify.sample_image(tiny_cfg)
    first, second = verify.sample_inputs(image, tiny_cfg)
    assert tuple(first.shape) == (3, 64, 64) and tuple(second.shape) == (3, 64, 128)
    assert torch.equal(second[..., :64], first) and torch.equal(second[..., 64:], first.flip(-1))


# Exports of a real checkpoint (tests/conftest.py trains it once per session).
@pytest.fixture
def checkpoint(exportable_checkpoint):
    return exportable_checkpoint


@pytest.mark.slow
def test_sidecar_describes_input_outputs_and_check(checkpoint, tmp_path):
    result = export_checkpoint(checkpoint, "torchscript", tmp_path / "det.ts")
    sidecar = json.loads((tmp_path / "det.ts.json").read_text())
    assert sidecar["format"] == "torchscript" and sidecar["file"] == "det.ts" and sidecar["preset"] == "demo"
    assert sidecar["checkpoint"] == str(checkpoint.resolve())
    assert sidecar["classes"] == ["circle", "square", "triangle", "star", "cross"]
    assert sidecar["category_ids"] == [1, 2, 3, 4, 5]
    given = sidecar["input"]
    assert given["channel_order"] == "BGR" and given["dtype"] == "float32" and given["value_range"] == [0, 255]
    assert given["resize"]["min_size"] == 64 and given["resize"]["max_size"] == 64
    assert len(given["pixel_mean"]) == len(given["pixel_std"]) == 3
    assert set(sidecar["outputs"]) == {"boxes", "scores", "classes"}
    check = sidecar["verification"]
    assert check["checked"] is True and check["within_tolerance"] is True and check["sample"].endswith("000001.png")
    assert check["tolerances"]["box_abs_px"] == verify.BOX_ATOL and check["tolerances"]["score_abs"] == verify.SCORE_ATOL
    assert check["max_box_diff"] == result.comparison.max_box_diff and check["num_eager"] == result.comparison.num_eager
    assert (tmp_path / "det.ts").stat().st_mode & 0o044  # readable by others, as a shipped file should be


@pytest.mark.slow
def test_mismatch_fails_and_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    real = verify.load_exported

    def shifted(path, fmt):
        run = real(path, fmt)
        return lambda image: (lambda b, s, c: (b + 0.01, s, c))(*run(image))

    monkeypatch.setattr(verify, "load_exported", shifted)
    with pytest.raises(LGDError) as error:
        export_checkpoint(checkpoint, "torchscript", tmp_path / "det.ts")
    message = error.value.message
    assert error.value.exit_code == 1 and "disagrees with the eager student" in message
    assert "largest box difference 0.01 px" in message and f"{tmp_path / 'det.ts'} was not written" in message
    assert list(tmp_path.iterdir()) == []  # no export, no sidecar, no temp file

    # An earlier export at the target stays as it was.
    (tmp_path / "det.ts").write_bytes(b"earlier")
    with pytest.raises(LGDError, match="earlier det.ts there is unchanged"):
        export_checkpoint(checkpoint, "torchscript", tmp_path / "det.ts")
    assert (tmp_path / "det.ts").read_bytes() == b"earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["det.ts"]


@pytest.mark.slow
def test_onnx_without_onnxruntime_writes_the_file_and_says_so(checkpoint, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx")
    from lgd_cli import cli

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    argv, sys.argv = sys.argv, ["lgd", "export", str(checkpoint), "--format", "onnx", "-o", str(tmp_path / "det.onnx")]
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
    finally:
        sys.argv = argv
    assert exit_info.value.code == 0
    assert "not verified" in capsys.readouterr().out
    assert (tmp_path / "det.onnx").stat().st_size > 1_000_000
    check = json.loads(Path(f"{tmp_path / 'det.onnx'}.json").read_text())["verification"]
    assert check["checked"] is False and "onnxruntime" in check["skipped_because"]
