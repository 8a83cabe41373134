"""COCO evaluation of a model or a checkpoint (pycocotools through detectron2's COCOEvaluator)."""
from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path
from typing import Sequence

import torch
from detectron2.data import DatasetMapper, MetadataCatalog, build_detection_test_loader
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.utils import comm

from lgd_cli.config.build import SavedConfig, build_config
from lgd_cli.data.datasets import VAL_DATASET
from lgd_cli.data.datasets import register_coco_json
from lgd_cli.engine.checkpoint import read_lgd_checkpoint
from lgd_cli.files import atomic_write_json
from lgd_cli.errors import DataError

SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class _ProgressLoader:
    """Wraps a test loader so that inference_on_dataset drives a progress bar of the Display, if any."""

    def __init__(self, loader, description: str, display=None):
        self.loader, self.description, self.display = loader, description, display

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        progress = self.display.progress() if self.display is not None and comm.is_main_process() else None
        if progress is None:
            yield from self.loader
            return
        with progress:
            task = progress.add_task(self.description, total=len(self.loader), detail="")
            for batch in self.loader:
                yield batch
                progress.advance(task)


def _test_mapper(cfg, teacher: bool) -> DatasetMapper:
    if not teacher:
        return DatasetMapper(cfg, is_train=False)
    # The teacher reads the ground truth, so the test-time mapper must keep the annotations
    # (detectron2's drops them when is_train=False); no random augmentation.
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")
    return DatasetMapper(is_train=True, augmentations=[resize], image_format=cfg.INPUT.FORMAT,
                         use_instance_mask=cfg.MODEL.MASK_ON, instance_mask_format=cfg.INPUT.MASK_FORMAT)


def evaluate_model(cfg, model, output_dir: Path, *, teacher: bool = False, dataset: str = VAL_DATASET,
                   display=None) -> dict:
    """COCO metrics of `model` on a registered dataset.

    Args:
        model: an LGDDistiller; `teacher=True` evaluates its teacher (an upper bound).
        display: where the progress bar goes (lgd_cli/engine/display.py); None: none.

    Returns:
        {"bbox": {"AP": ..., "AP50": ..., "AP-<class>": ...}} (+ "segm" with masks).
    """
    output_dir = Path(output_dir)
    if comm.is_main_process():  # the one that writes (another machine's --output gets no eval folder)
        output_dir.mkdir(parents=True, exist_ok=True)
    loader = build_detection_test_loader(cfg, dataset, mapper=_test_mapper(cfg, teacher))
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    evaluator = COCOEvaluator(dataset, tasks=tasks, distributed=True, output_dir=str(output_dir), use_fast_impl=False)
    was_training, model.evaluate_teacher = model.training, teacher
    try:
        # pycocotools prints its own summary; lgd renders a table instead.
        with contextlib.redirect_stdout(io.StringIO()):
            results = inference_on_dataset(model, _ProgressLoader(loader, "eval teacher" if teacher else "eval", display), evaluator)
    finally:
        model.evaluate_teacher = False
        model.train(was_training)
    return copy.deepcopy(dict(results))


def evaluate_checkpoint(checkpoint: Path, *, overrides: Sequence[str] = (), data: tuple[Path, Path] | None = None,
                        eval_teacher: bool = False, output: Path | None = None, device: str | None = None,
                        display=None) -> dict:
    """Rebuild the model from a checkpoint's embedded config and evaluate it.

    `display` shows the progress (lgd_cli/engine/display.py); None: none.

    Returns:
        {"checkpoint", "preset", "dataset", "student": metrics, ["teacher": metrics]}; also
        written to <output>/metrics.json beside COCO-format predictions.
    """
    from lgd_cli.data.datasets import register_config_datasets
    from lgd_cli.engine.logs import log_to_file
    from lgd_cli.modeling.distiller import build_distiller

    checkpoint = Path(checkpoint)
    state = read_lgd_checkpoint(checkpoint)
    cfg = build_config(SavedConfig(state["lgd"]["config"], str(checkpoint)), overrides, device=device)
    if data is not None:
        dataset, json_file = "lgd_eval_custom", data[0]
        names = register_coco_json(dataset, Path(data[0]), Path(data[1]), bad_boxes=cfg.LGD.DATA.BAD_BOXES,
                                   allow_outside_root=bool(cfg.LGD.DATA.ALLOW_OUTSIDE_ROOT))
    else:
        dataset, json_file = VAL_DATASET, cfg.LGD.DATA.VAL_JSON
        register_config_datasets(cfg, splits=("val",))
        names = MetadataCatalog.get(VAL_DATASET).thing_classes
    if list(names) != list(cfg.LGD.CLASS_NAMES):
        raise DataError(f"{json_file} has classes {list(names)}, but {checkpoint} was trained on "
                        f"{list(cfg.LGD.CLASS_NAMES)}", hint="evaluate on data with the same categories, in the same order")
    model = build_distiller(cfg)
    model.load_state_dict(state["model"])
    model.eval()
    if eval_teacher and model.teacher is None:
        raise DataError(f"{checkpoint} was trained without LGD (--no-lgd): there is no teacher to evaluate")
    output = Path(output) if output is not None else checkpoint.parent / "eval"
    output.mkdir(parents=True, exist_ok=True)
    log_to_file(output / "log.txt")
    results = {"checkpoint": str(checkpoint), "preset": cfg.LGD.PRESET,
               "dataset": MetadataCatalog.get(dataset).json_file}
    with torch.no_grad():
        results["student"] = evaluate_model(cfg, model, output, dataset=dataset, display=display)
        if eval_teacher:
            results["teacher"] = evaluate_model(cfg, model, output / "teacher", teacher=True, dataset=dataset,
                                                 display=display)
    atomic_write_json(output / "metrics.json", results)
    results["metrics_file"] = str(output / "metrics.json")
    return results
