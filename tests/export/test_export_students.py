"""`lgd export` and `lgd predict` on FCOS and Faster R-CNN students (RetinaNet: test_trace.py, test_predict.py)."""
import json
from pathlib import Path

import pytest

from lgd_cli.config.build import build_config
from lgd_cli.export import export_checkpoint, trace

from tests.helpers import STUDENT_OVERRIDES, widen_head


@pytest.fixture(scope="module", params=["fcos", "faster"])
def student_checkpoint(request, tiny_overrides, tmp_path_factory):
    """(detector, model_final.pth) of a 2-iteration LGD run."""
    from lgd_cli.engine.train import train

    out = tmp_path_factory.mktemp(f"run-{request.param}")
    cfg = build_config("demo", tiny_overrides + STUDENT_OVERRIDES[request.param] + [
        "SOLVER.MAX_ITER=2", "SOLVER.CHECKPOINT_PERIOD=2"], device="cpu")
    train(cfg, out)
    if request.param == "fcos":
        # As for RetinaNet: spread the scores apart so that "the same detections" is defined.
        widen_head(out / "model_final.pth")
    return request.param, out / "model_final.pth"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_the_eager_student(student_checkpoint, fmt, tmp_path):
    detector, checkpoint = student_checkpoint
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    result = export_checkpoint(checkpoint, fmt, tmp_path / f"det.{fmt}")
    c = result.comparison
    assert c.ok and min(c.num_eager) > 0 and c.num_eager == c.num_exported and c.max_box_diff < 1e-3
    sidecar = json.loads(result.sidecar.read_text())
    student, _ = trace.load_student(checkpoint)
    assert sidecar["detector"] == ("FCOS" if detector == "fcos" else "GeneralizedRCNN")
    assert sidecar["postprocess"] == trace.postprocess_settings(student)
    assert result.parameters == sum(p.numel() for p in student.parameters())


@pytest.mark.slow
def test_predict_applies_the_score_threshold(student_checkpoint, tiny_data, tmp_path):
    from lgd_cli.engine.predict import predict

    _, checkpoint = student_checkpoint
    image = min(Path(tiny_data.val_images).glob("*.png"))
    student, _ = trace.load_student(checkpoint)
    trace.set_score_thresh(student, 0.25)
    assert trace.postprocess_settings(student)["score_thresh"] == 0.25
    result = predict(checkpoint, [image], tmp_path / "out", score_thresh=0.0, device="cpu")
    assert result.images[0][2] > 0
    detections = json.loads((tmp_path / "out" / "detections.json").read_text())
    cut = sorted(d["score"] for d in detections)[len(detections) // 2]
    result = predict(checkpoint, [image], tmp_path / "cut", score_thresh=cut, device="cpu")
    kept = json.loads((tmp_path / "cut" / "detections.json").read_text())
    assert 0 < len(kept) < len(detections) and all(d["score"] > cut - 1e-5 for d in kept)
