"""Each detectron2 0.6 shim: the thing that fails without it works with it."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lgd_cli.compat import detectron2 as compat

compat.apply()


def test_compiled_ops_stub_lets_layers_import():
    import detectron2.layers  # noqa: F401  (imports detectron2._C at import time)

    if not compat.has_compiled_ops():
        assert "detectron2._C" in sys.modules


def test_pillow_linear_alias_lets_transforms_import():
    from detectron2.data.transforms import transform

    assert Image.LINEAR == Image.BILINEAR
    assert transform.ExtentTransform.__init__.__defaults__[0] == Image.BILINEAR


def test_numpy_aliases_let_class_histogram_run(caplog):
    from detectron2.data.build import print_instances_class_histogram

    assert np.int is int and np.float is float
    dicts = [{"annotations": [{"category_id": 0}, {"category_id": 1}]}]
    print_instances_class_histogram(dicts, ["a", "b"])  # raises AttributeError without the alias


def test_tracing_adapter_imports_without_caffe2():
    from detectron2.export.flatten import TracingAdapter

    assert callable(TracingAdapter)


def test_retinanet_head_builds_with_group_norm():
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

    head = RetinaNetHead(input_shape=[ShapeSpec(channels=64)] * 2, num_classes=3, num_anchors=9,
                         conv_dims=[64, 64], norm="GN")
    logits, deltas = head([torch.randn(1, 64, 8, 8), torch.randn(1, 64, 4, 4)])
    assert logits[0].shape == (1, 27, 8, 8) and deltas[1].shape == (1, 36, 4, 4)
    assert any(isinstance(m, torch.nn.GroupNorm) and m.num_groups == 32 for m in head.modules())


@pytest.mark.parametrize("modulated", [False, True])
def test_deformable_conv_matches_torchvision_forward_and_backward(modulated):
    from detectron2.layers import DeformConv, ModulatedDeformConv
    from torchvision.ops import deform_conv2d

    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 5, dtype=torch.double, requires_grad=True)
    offset = torch.randn(1, 18, 5, 5, dtype=torch.double, requires_grad=True)
    if modulated:
        layer = ModulatedDeformConv(2, 3, 3, padding=1, bias=True).double()
        mask = torch.rand(1, 9, 5, 5, dtype=torch.double, requires_grad=True)
        out = layer(x, offset, mask)
        ref = deform_conv2d(x, offset, layer.weight, layer.bias, padding=(1, 1), mask=mask)
        inputs = (x, offset, mask)
    else:
        layer = DeformConv(2, 3, 3, padding=1).double()
        out = layer(x, offset)
        ref = deform_conv2d(x, offset, layer.weight, padding=(1, 1))
        inputs = (x, offset)
    torch.testing.assert_close(out, ref)
    # Without the shim the backward raises "not supported on CPUs".
    assert torch.autograd.gradcheck(lambda *a: layer(*a), inputs, eps=1e-6, atol=1e-4)


def test_deformable_resnet_trains_on_cpu():
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, False, False, True]
    cfg.MODEL.RESNETS.DEFORM_MODULATED = True
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    out = backbone(torch.randn(1, 3, 64, 64))["res5"]
    out.mean().backward()
    deform = [m for m in backbone.modules() if type(m).__name__ == "ModulatedDeformConv"]
    assert deform and all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in deform)


def test_gradient_clipping_skips_parameters_without_gradient():
    from detectron2.config import get_cfg
    from detectron2.solver.build import maybe_add_gradient_clipping

    cfg = get_cfg()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    used, frozen = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    optimizer = maybe_add_gradient_clipping(cfg, torch.optim.SGD([used, frozen], lr=1.0))
    used.grad = torch.tensor([5.0, -0.5])  # frozen.grad stays None, as in the freeze window
    optimizer.step()
    torch.testing.assert_close(used.detach(), torch.tensor([0.0, 1.5]))  # clipped to 1.0 by value
    torch.testing.assert_close(frozen.detach(), torch.ones(2))
