"""Shared fixtures: a tiny synthetic dataset and the overrides of a tiny, fast LGD config."""
from __future__ import annotations

import os

import pytest

from lgd_cli.compat import detectron2 as _compat

# Test modules import detectron2 directly; the shims must be in place first.
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
    ]


@pytest.fixture(scope="session")
def tiny_cfg(tiny_overrides):
    from lgd_cli.config.build import build_config

    return build_config("demo", tiny_overrides, device="cpu")
