"""model_best.pth across --resume: a resumed run starts from the best score already reached."""
import json
from types import SimpleNamespace

from detectron2.utils.events import EventStorage

from lgd_cli.engine.hooks import ResumableBestCheckpointer


class RecordingCheckpointer:
    def __init__(self, save_dir):
        self.save_dir, self.saved = str(save_dir), []

    def save(self, name, **extra):
        self.saved.append((name, extra))


def hook_after_resume(tmp_path, start_iter: int, rows: list[dict], best_file: bool = True):
    (tmp_path / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 9, "stu')
    if best_file:
        (tmp_path / "model_best.pth").write_bytes(b"weights")
    checkpointer = RecordingCheckpointer(tmp_path)
    hook = ResumableBestCheckpointer(2, checkpointer, "student/bbox/AP", mode="max", file_prefix="model_best",
                                     metrics_file=tmp_path / "metrics.json")
    hook.trainer = SimpleNamespace(start_iter=start_iter, iter=start_iter, max_iter=20)
    hook.before_train()
    return hook, checkpointer


ROWS = [{"iteration": 1, "student/bbox/AP": 30.0}, {"iteration": 3, "student/bbox/AP": 42.0},
        {"iteration": 3, "loss_cls": 0.5}, {"iteration": 5, "student/bbox/AP": None},
        {"iteration": 7, "student/bbox/AP": 50.0}]


def test_the_best_score_before_the_resumed_iteration_is_the_one_to_beat(tmp_path):
    hook, checkpointer = hook_after_resume(tmp_path, start_iter=6, rows=ROWS)  # iteration 7 is redone, NaN skipped
    assert (hook.best_metric, hook.best_iter) == (42.0, 3)
    with EventStorage(7) as storage:
        hook.trainer.storage = storage
        storage.put_scalar("student/bbox/AP", 40.0)  # worse than before the interruption: model_best stays
        hook._best_checking()
        assert checkpointer.saved == []
        storage.put_scalar("student/bbox/AP", 45.0)
        hook._best_checking()
    assert checkpointer.saved == [("model_best", {"iteration": 7})] and hook.best_metric == 45.0


def test_a_fresh_run_or_a_missing_model_best_starts_from_nothing(tmp_path):
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    fresh.mkdir(), resumed.mkdir()
    assert hook_after_resume(fresh, start_iter=0, rows=ROWS)[0].best_metric is None
    assert hook_after_resume(resumed, start_iter=6, rows=ROWS, best_file=False)[0].best_metric is None
