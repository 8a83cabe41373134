"""Where a run's logs go: log.txt, the periodic training lines, metrics.json."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from detectron2.utils.events import CommonMetricPrinter, JSONWriter, get_event_storage

from lgd_cli.engine.resources import peak_memory_mb
from lgd_cli.files import finite_or_null


def log_to_file(path: Path) -> None:
    """detectron2's and lgd's logs go to the run's log.txt (the CLI decides what the terminal shows).

    detectron2's and fvcore's loggers stop there; lgd's also reaches the handlers the CLI put on it
    (lgd_cli/console.py, setup_logging) and any the root logger has (pytest's caplog).
    """
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", "%m/%d %H:%M:%S"))
    handler._lgd_run_log = True
    for name in ("detectron2", "fvcore", "lgd_cli"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, "_lgd_run_log", False)]:
            logger.removeHandler(old)  # a later run in the same process logs to its own folder
            old.close()
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)  # DEBUG (lgd --debug) stays
        logger.propagate = name == "lgd_cli"
        logger.addHandler(handler)


class OrderedJSONWriter(JSONWriter):
    """detectron2's JSONWriter, but each write's lines in iteration order and valid JSON (null, not NaN).

    detectron2 writes one line per iteration that has new scalars in the order the keys were first
    stored, so a scalar stored less often (an evaluation, a skip counter) could land on an earlier
    iteration's line after a later one's; and json.dumps writes COCOeval's NaN as `NaN`.
    """

    def write(self):
        storage = get_event_storage()
        by_iteration: dict[int, dict] = {}
        for key, (value, iteration) in storage.latest_with_smoothing_hint(self._window_size).items():
            if iteration > self._last_write:
                by_iteration.setdefault(iteration, {})[key] = finite_or_null(value)
        for iteration in sorted(by_iteration):
            line = {**by_iteration[iteration], "iteration": iteration}
            self._file_handle.write(json.dumps(line, sort_keys=True, allow_nan=False) + "\n")
        if by_iteration:
            self._last_write = max(by_iteration)
        self._file_handle.flush()
        try:
            os.fsync(self._file_handle.fileno())
        except (AttributeError, OSError):
            pass


class TrainingLogWriter(CommonMetricPrinter):
    """One line per write to the "lgd_cli.periodic" logger (log.txt; stdout when it is no terminal).

    detectron2's CommonMetricPrinter knows one "lr"; this line has iterations done/total, ETA, every
    loss term (median of the window), both learning rates, s/iter, data time and peak memory.
    """

    def __init__(self, max_iter: int, device: str, window_size: int = 20):
        super().__init__(max_iter, window_size)
        self.logger = logging.getLogger("lgd_cli.periodic")
        self.device = device

    def write(self):
        storage = get_event_storage()
        iteration = storage.iter
        histories = storage.histories()
        if iteration >= self._max_iter or "total_loss" not in histories:
            return  # after the last step (the final evaluation's write): no training news
        eta = self._get_eta(storage)
        parts = [f"iter {iteration + 1}/{self._max_iter}", f"eta {eta}" if eta else None]
        parts += [f"{k} {histories[k].median(self._window_size):.4g}"
                  for k in ["total_loss", *sorted(k for k in histories if k.startswith("loss_"))]]
        parts += [f"{k} {histories[k].latest():.3g}" for k in ("lr_student", "lr_teacher") if k in histories]
        if "time" in histories:
            parts.append(f"{histories['time'].global_avg():.3f} s/iter")
        if "data_time" in histories:
            parts.append(f"data {histories['data_time'].avg(self._window_size):.3f} s")
        parts.append(f"peak mem {peak_memory_mb(self.device):.0f} MB")
        self.logger.info("  ".join(p for p in parts if p))


def log_banner(cfg, output: Path, *, start_iter: int, processes: int, train_images: int, val_images: int | None,
               resumed_from: str | None = None) -> None:
    """The run's first lines in log.txt (and stdout when it is no terminal): what trains where."""
    data = cfg.LGD.DATA
    lines = [
        f"lgd train: preset {cfg.LGD.PRESET or '(file)'}, {'LGD' if cfg.MODEL.DISTILLATOR.ENABLED else 'baseline (--no-lgd)'}"
        f", device {cfg.MODEL.DEVICE}, {processes} process{'es' if processes > 1 else ''}",
        f"train set: {train_images} images, {data.TRAIN_JSON or data.SOURCE}",
        f"val set: {val_images} images, {data.VAL_JSON or data.SOURCE}" if val_images is not None else None,
        f"input: shorter side {tuple(cfg.INPUT.MIN_SIZE_TRAIN)}, longer at most {cfg.INPUT.MAX_SIZE_TRAIN} (test "
        f"{cfg.INPUT.MIN_SIZE_TEST}/{cfg.INPUT.MAX_SIZE_TEST}); batch {cfg.SOLVER.IMS_PER_BATCH}",
        f"iterations: {cfg.SOLVER.MAX_ITER}, checkpoint every {cfg.SOLVER.CHECKPOINT_PERIOD}, "
        + (f"evaluation every {cfg.TEST.EVAL_PERIOD}" if cfg.TEST.EVAL_PERIOD > 0 else "no periodic evaluation")
        + (", evaluation at the end" if cfg.LGD.EVAL_AT_END else ""),
        f"output: {output}",
        f"resuming at iteration {start_iter} from {resumed_from}" if resumed_from else "starting at iteration 0",
    ]
    logger = logging.getLogger("lgd_cli")
    for line in lines:
        if line:
            logger.info(line)
