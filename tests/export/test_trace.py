"""Tracing the student of a real checkpoint: TorchScript and ONNX round trips, student-only graphs, the CLI."""
import json
from pathlib import Path

import pytest
import torch

from lgd_cli.export import export_checkpoint, trace

from tests.helpers import fill_disk_after, run_cli


@pytest.fixture
def checkpoint(exportable_checkpoint):
    return exportable_checkpoint


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_round_trip_is_exact_and_holds_only_the_student(checkpoint, tmp_path):
    result = export_checkpoint(checkpoint, "torchscript", tmp_path / "det.ts")
    c = result.comparison
    # Both sample inputs (the val image and a wider one) give detections, and the trace reproduces them.
    assert c.ok and c.sizes == [[64, 64], [64, 128]] and min(c.num_eager) > 0 and c.num_eager == c.num_exported
    assert c.max_box_diff == 0.0 and c.max_score_diff == 0.0 and c.unmatched == 0

    student, _ = trace.load_student(checkpoint)
    module = torch.jit.load(str(tmp_path / "det.ts"))
    student_params = sum(p.numel() for p in student.parameters())
    assert sum(p.numel() for p in module.parameters()) == student_params == result.parameters
    full = torch.load(checkpoint, weights_only=True)["model"]
    assert sum(v.numel() for k, v in full.items() if not k.startswith("student.")) > 0  # there was a teacher
    assert not [k for k in module.state_dict() if "teacher" in k or "distill" in k]

    # A new image size runs through the saved file as it does through the eager student.
    image = torch.rand(3, 96, 160) * 255
    boxes, scores, classes = module(image)
    eager = trace.detections(student, image)
    assert torch.equal(boxes, eager[0]) and torch.equal(scores, eager[1]) and torch.equal(classes, eager[2])
    assert boxes.shape[1] == 4 and classes.dtype == torch.int64


@pytest.mark.slow
def test_onnx_round_trip_within_tolerance(checkpoint, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    result = export_checkpoint(checkpoint, "onnx", tmp_path / "det.onnx")
    c = result.comparison
    assert c.ok and min(c.num_eager) > 0 and c.max_box_diff < 1e-3 and c.max_score_diff < 1e-5

    graph = onnx.load(str(tmp_path / "det.onnx")).graph
    assert [i.name for i in graph.input] == ["image"] and [o.name for o in graph.output] == ["boxes", "scores", "classes"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in dims] == [3, "height", "width"]
    names = [init.name for init in graph.initializer]
    assert not [n for n in names if "teacher" in n or "distill" in n]
    # The exporter folds each BatchNorm into its conv, so the count is the student's within 1%;
    # the teacher and adapter would add 2.9M (25%).
    weights = sum(int(torch.tensor(i.dims).prod()) for i in graph.initializer)
    full = torch.load(checkpoint, weights_only=True)["model"]
    teacher = sum(v.numel() for k, v in full.items() if not k.startswith("student."))
    assert abs(weights - result.parameters) < 0.01 * result.parameters < teacher


@pytest.mark.slow
def test_cli_export_prints_the_differences_and_writes_beside_the_checkpoint(checkpoint, capsys):
    output, sidecar = checkpoint.parent / "model.ts", checkpoint.parent / "model.ts.json"
    try:
        assert run_cli("export", str(checkpoint)) == 0
        out = capsys.readouterr().out
        assert "largest box difference" in out and "largest score difference" in out and "verified" in out
        assert output.is_file() and json.loads(sidecar.read_text())["verification"]["within_tolerance"] is True
    finally:
        output.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)


@pytest.mark.parametrize("args, message, code", [
    (["export", "missing.pth"], "missing.pth does not exist", 1),
    (["export", "missing.pth", "--format", "tflite"], "'tflite' is not one of 'torchscript', 'onnx'", 2),
])
def test_cli_export_bad_input(args, message, code, capsys):
    assert run_cli(*args) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_export_on_a_full_disk_names_the_output_and_leaves_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    fill_disk_after(monkeypatch, torch.jit)
    output = tmp_path / "out" / "model.ts"
    assert run_cli("export", str(checkpoint), "-o", str(output)) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"{output}: No space left on device" in err and "Traceback" not in err
    assert list(output.parent.iterdir()) == []


def test_cli_export_hands_the_engine_its_arguments(monkeypatch, tmp_path):
    import lgd_cli.export as engine_export

    seen = []
    monkeypatch.setattr(engine_export, "export_checkpoint", lambda *args: seen.append(args) or "result")
    monkeypatch.setattr("lgd_cli.render.export", lambda result: seen.append(result))
    assert run_cli("export", "run/model_final.pth", "--format", "onnx", "-o", str(tmp_path / "x.onnx")) == 0
    assert seen == [(Path("run/model_final.pth"), "onnx", tmp_path / "x.onnx"), "result"]


def test_category_ids_follow_the_training_json(tiny_cfg, tmp_path):
    cfg = tiny_cfg.clone()
    cfg.defrost()
    cfg.LGD.CLASS_NAMES = ["a", "b", "c"]
    cfg.LGD.DATA.TRAIN_JSON = str(tmp_path / "train.json")
    (tmp_path / "train.json").write_text(json.dumps({"categories": [
        {"id": 90, "name": "c"}, {"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}))
    assert trace.category_ids(cfg) == [3, 7, 90]  # detectron2's contiguous order: sorted ids
    (tmp_path / "train.json").unlink()
    assert trace.category_ids(cfg) == [1, 2, 3]  # json gone: 1-based indices


def test_model_input_resizes_like_the_test_mapper(tiny_cfg):
    import numpy as np

    image = np.zeros((32, 48, 3), dtype=np.uint8)
    image[..., 2] = 255
    x = trace.model_input(image, tiny_cfg)  # MIN_SIZE_TEST = MAX_SIZE_TEST = 64
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, 43, 64)
    assert x[2].max() == 255 and x[0].max() == 0  # values stay 0-255, channels unchanged
