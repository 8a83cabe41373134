"""Every shipped preset parses and builds its full-size model (on the meta device: shapes, no memory)."""
import pytest
import torch

from lgd_cli.config.build import build_config
from lgd_cli.config.presets import list_presets
from lgd_cli.modeling.distiller import LGDDistiller

PRESETS = [p.name for p in list_presets()]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_builds_its_model(preset):
    cfg = build_config(preset, device="cpu", resolve_dataset=False)
    with torch.device("meta"):
        model = LGDDistiller(cfg)
    assert type(model.student).__name__ == cfg.MODEL.META_ARCHITECTURE
    assert type(model.student.backbone).__name__ == "FPN"
    # The teacher exists and sees exactly the student's FPN levels and width.
    assert model.teacher is not None
    assert model.distill_loss is not None
    strides = model.seams.strides()
    assert strides == sorted(strides) and len(strides) == 5
    assert len(model.frozen_backbone_parameters()) > 0
    if cfg.MODEL.MASK_ON:
        assert model.student.roi_heads.mask_on


def test_every_detector_and_backbone_of_the_paper_has_a_preset():
    names = set(PRESETS)
    for detector in ("retinanet", "fcos", "faster-rcnn"):
        for backbone in ("r50", "r101", "r101-dcn", "x101-dcn"):
            assert f"{detector}-{backbone}-2x" in names
    assert {"retinanet-swint-3x", "mask-rcnn-swint-3x"} <= names
    assert {"demo", "fcos-demo", "faster-rcnn-demo", "mask-rcnn-demo"} <= names


def test_checkpoint_config_without_the_option_keys_keeps_the_rules_it_was_trained_with():
    from lgd_cli.config.build import SavedConfig

    keys = {"LABEL_ENCODER": {"BOX_CLAMP": "image", "EMPTY_IMAGE": "context"},
            "TEACHER": {"CELL_MAPPING": "stride", "LOSS_NORMALIZER": "per_step"}}
    cfg = build_config("demo", device="cpu", resolve_dataset=False)
    current = build_config(SavedConfig.of(cfg), device="cpu")
    assert all(current.MODEL.DISTILLATOR[b][k] == "reference" for b in keys for k in keys[b])

    old = cfg.clone()
    old.defrost()
    for block, names in keys.items():
        for name in names:
            del old.MODEL.DISTILLATOR[block][name]
    legacy = build_config(SavedConfig.of(old), device="cpu")
    assert {b: {k: legacy.MODEL.DISTILLATOR[b][k] for k in keys[b]} for b in keys} == keys
