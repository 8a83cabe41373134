"""Real runs of the `lgd` command on the tiny synthetic set: train -> resume -> eval, and 2 processes on gloo."""
import json

import pytest
import torch

from lgd_cli.files import read_metrics
from tests.helpers import lgd, sets, signal_at_first_checkpoint


@pytest.mark.slow
def test_train_resume_eval(tiny_overrides, tmp_path):
    out = tmp_path / "run"
    # 1. Six iterations, checkpoints at 3 and 6.
    lgd("train", "--output", str(out), *sets(tiny_overrides))
    assert (out / "model_final.pth").is_file() and (out / "model_0000002.pth").is_file()
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert not list(out.glob(".*.tmp"))
    state = torch.load(out / "model_final.pth", weights_only=True)  # plain data only
    assert state["lgd"]["class_names"] == ["circle", "square", "triangle", "star", "cross"]
    assert state["trainer"]["iteration"] == 5 and set(state["trainer"]["optimizers"]) == {"student", "teacher"}

    # 2. The same folder again without --resume/--force is refused; nothing is touched.
    refused = lgd("train", "--output", str(out), *sets(tiny_overrides), check=False)
    assert refused.returncode == 2 and "already holds a training run" in refused.stderr
    assert "Traceback" not in refused.stderr

    # 3. Resume to 9 iterations: continues at iteration 6 with the saved schedules.
    lgd("train", "--output", str(out), "--resume", *sets(tiny_overrides + ["SOLVER.MAX_ITER=9"]))
    iterations = [m["iteration"] for m in read_metrics(out / "metrics.json") if "total_loss" in m]
    assert iterations[-1] == 8
    resumed = torch.load(out / "model_final.pth", weights_only=True)
    assert resumed["trainer"]["iteration"] == 8
    assert resumed["trainer"]["hooks"]["LGDScheduleHook"]["student"]["last_epoch"] == 9

    # 4. Evaluate: COCO AP table and metrics.json, student and teacher. After 9 iterations every
    #    score is still near the 0.01 prior, under the 0.05 test threshold: without detections COCO
    #    reports NaN (null in the file). A zero threshold keeps the top detections so that COCOeval
    #    scores real boxes; 9 iterations learn nothing, so AP may be as low as 0.
    result = lgd("eval", str(out / "model_final.pth"), "--eval-teacher",
                 "--set", "MODEL.RETINANET.SCORE_THRESH_TEST=0.0")
    assert "AP50" in result.stdout and "upper bound" in result.stdout
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    for who in ("student", "teacher"):
        bbox = metrics[who]["bbox"]
        for key in ("AP", "AP50", "AP75"):
            assert isinstance(bbox[key], float) and 0.0 <= bbox[key] <= 100.0, (who, bbox)  # not null (NaN)


@pytest.mark.slow
def test_two_process_gloo_training(tiny_overrides, tmp_path):
    out = tmp_path / "ddp"
    # A data-loader worker per process: spawned processes must still fork workers that keep
    # lgd's detectron2 shims (compat.fork_data_workers).
    lgd("train", "--gpus", "2", "--output", str(out),
        *sets(tiny_overrides + ["SOLVER.MAX_ITER=4", "DATALOADER.NUM_WORKERS=1"]))
    state = torch.load(out / "model_final.pth", weights_only=True)
    assert state["trainer"]["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert (out / "log.txt").is_file() and (out / "log.txt.rank1").is_file()


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_finishes(tiny_overrides, tmp_path):
    import signal

    out = tmp_path / "term"
    pairs = tiny_overrides + ["SOLVER.MAX_ITER=40", "SOLVER.CHECKPOINT_PERIOD=5"]
    returncode, err = signal_at_first_checkpoint(out, pairs, signal.SIGTERM)
    assert returncode == 143, err
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    stopped_at = torch.load(out / (out / "last_checkpoint").read_text(), weights_only=True)["trainer"]["iteration"]
    assert 4 <= stopped_at < 39
    lgd("train", "--output", str(out), "--resume", *sets(pairs))
    assert torch.load(out / "model_final.pth", weights_only=True)["trainer"]["iteration"] == 39
