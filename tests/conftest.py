"""Shared fixtures: a tiny synthetic dataset, the overrides of a tiny, fast LGD config, models built
from it. Plain helpers are in tests/helpers.py."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from lgd_cli.compat import detectron2 as _compat
from tests.helpers import STUDENT_OVERRIDES, widen_head

# Every lgd package applies the detectron2 shims when imported (lgd_cli/config/__init__.py...),
# but test modules also import detectron2 before any lgd package, and lgd_cli.compat itself
# applies nothing on import: apply them here, before pytest imports the test modules.
_compat.apply()

# Keep every test's cache (synthetic set, cleaned jsons) out of the user's ~/.cache.
os.environ.setdefault("LGD_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "lgd-test-cache"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """8 training and 4 validation images of 64 px (COCO json + PNGs)."""
    from lgd_cli.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("tiny") / "shapes", num_train=8, num_val=4, image_size=64, seed=3)


@pytest.fixture(scope="session")
def tiny_overrides(tiny_data):
    """`--set` pairs turning the demo preset into a seconds-long run on `tiny_data` (C = 32, K = 5)."""
    return [
        "LGD.DATA.SOURCE=custom",
        f"LGD.DATA.TRAIN_JSON={tiny_data.train_json}", f"LGD.DATA.TRAIN_IMAGES={tiny_data.train_images}",
        f"LGD.DATA.VAL_JSON={tiny_data.val_json}", f"LGD.DATA.VAL_IMAGES={tiny_data.val_images}",
        "SOLVER.IMS_PER_BATCH=2", "SOLVER.MAX_ITER=6", "SOLVER.CHECKPOINT_PERIOD=3",
        "INPUT.MIN_SIZE_TRAIN=(64,)", "INPUT.MAX_SIZE_TRAIN=64", "INPUT.MIN_SIZE_TEST=64", "INPUT.MAX_SIZE_TEST=64",
        "MODEL.FPN.OUT_CHANNELS=32", "DATALOADER.NUM_WORKERS=0", "SEED=7",
        # p7 of a 64-px image is 1x1: GroupNorm(32) over 32 channels would see one value per group.
        "MODEL.RETINANET.NORM=",
    ]


@pytest.fixture(scope="session")
def tiny_cfg(tiny_overrides):
    from lgd_cli.config.build import build_config

    return build_config("demo", tiny_overrides, device="cpu")


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_overrides, tmp_path_factory):
    """model_final.pth of a real 2-iteration LGD run on `tiny_data`, trained once per session."""
    from lgd_cli.config.build import build_config
    from lgd_cli.engine.train import train

    out = tmp_path_factory.mktemp("run")
    train(build_config("demo", tiny_overrides + ["SOLVER.MAX_ITER=2", "SOLVER.CHECKPOINT_PERIOD=2"], device="cpu"), out)
    return out / "model_final.pth"


@pytest.fixture(scope="session")
def exportable_checkpoint(trained_checkpoint, tmp_path_factory):
    """A copy of `trained_checkpoint` whose head outputs are spread apart (see widen_head)."""
    path = tmp_path_factory.mktemp("widened") / "model_final.pth"
    shutil.copy(trained_checkpoint, path)
    widen_head(path)
    return path


def _tiny_config(tiny_overrides, extra, num_classes_keys):
    """The tiny config on K = 3 classes (not 80) and C = 32 channels (not 256), no dataset resolved."""
    from lgd_cli.config.build import build_config

    cfg = build_config("demo", tiny_overrides + ["LGD.DATA.SOURCE=synthetic", *extra], device="cpu",
                       resolve_dataset=False)
    cfg.defrost()
    cfg.LGD.CLASS_NAMES = ["a", "b", "c"]
    for key in num_classes_keys:
        cfg.MODEL[key].NUM_CLASSES = 3
    return cfg


@pytest.fixture
def model_factory(tiny_overrides):
    """build(*pairs): a tiny LGD RetinaNet in train mode, the same initial weights each time."""
    from lgd_cli.modeling.distiller import build_distiller

    def build(*extra):
        cfg = _tiny_config(tiny_overrides, extra, ("RETINANET",))
        torch.manual_seed(0)
        return build_distiller(cfg).train()
    return build


@pytest.fixture
def build(tiny_overrides):
    """build(detector, *pairs, eval_mode=False): a tiny LGD FCOS / Faster / Mask R-CNN (STUDENT_OVERRIDES)."""
    from lgd_cli.modeling.distiller import build_distiller

    def build(detector, *extra, eval_mode=False):
        cfg = _tiny_config(tiny_overrides, [*STUDENT_OVERRIDES[detector], *extra], ("FCOS", "ROI_HEADS"))
        torch.manual_seed(0)
        model = build_distiller(cfg)
        return model.eval() if eval_mode else model.train()
    return build


