"""Backbones: Swin-T + FPN shapes, freezing and drop-path; DCNv2 gradients; X-101-DCN; MODEL.WEIGHTS loading."""
import pickle

import numpy as np
import pytest
import torch
import torchvision
from detectron2.layers import DeformConv, ModulatedDeformConv
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone.resnet import DeformBottleneckBlock
from detectron2.structures import ImageList

from lgd_cli.config.build import build_config
from lgd_cli.errors import CheckpointError, ConfigError
from lgd_cli.modeling.backbones.pretrained import (
    TORCHVISION_INPUT,
    load_pretrained_weights,
    torchvision_resnet_to_detectron2,
)
from lgd_cli.modeling.backbones.swin import SwinTransformer

SMALL_SWIN = ["MODEL.SWINT.EMBED_DIM=16", "MODEL.SWINT.DEPTHS=[1,1,2,1]", "MODEL.SWINT.NUM_HEADS=[1,2,2,4]",
              "MODEL.SWINT.WINDOW_SIZE=3", "MODEL.FPN.OUT_CHANNELS=16"]


def _small_swin(**kwargs) -> SwinTransformer:
    args = {"embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 2, 4), "window": 3}
    return SwinTransformer(**{**args, **kwargs})


def test_swin_tiny_names_strides_channels():
    with torch.device("meta"):
        trunk = SwinTransformer()  # Swin-Tiny defaults: embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7
    shapes = trunk.output_shape()
    assert list(shapes) == ["stage2", "stage3", "stage4", "stage5"]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32]
    assert [s.channels for s in shapes.values()] == [96, 192, 384, 768]
    assert trunk.size_divisibility == 32
    assert sum(p.numel() for p in trunk.parameters()) == 27_520_698  # Swin-T 28.29M minus head, plus stage norms


@pytest.mark.parametrize("hw", [(100, 130), (64, 64), (33, 47)])
def test_swin_takes_any_size(hw):
    trunk = _small_swin().eval()
    with torch.no_grad():
        out = trunk(torch.randn(1, 3, *hw))
    for name, spec in trunk.output_shape().items():
        assert out[name].shape == (1, spec.channels, -(-hw[0] // spec.stride), -(-hw[1] // spec.stride))


@pytest.mark.parametrize("preset, levels, trunk_features", [
    ("retinanet-swint-3x", ["p3", "p4", "p5", "p6", "p7"], ["stage3", "stage4", "stage5"]),
    ("mask-rcnn-swint-3x", ["p2", "p3", "p4", "p5", "p6"], ["stage2", "stage3", "stage4", "stage5"]),
])
def test_swin_fpn_builders_of_the_presets(preset, levels, trunk_features):
    cfg = build_config(preset, SMALL_SWIN, device="cpu", resolve_dataset=False)
    backbone = build_backbone(cfg)
    assert isinstance(backbone.bottom_up, SwinTransformer)
    assert list(backbone.bottom_up.output_shape()) == trunk_features
    assert list(backbone.output_shape()) == levels
    assert [s.stride for s in backbone.output_shape().values()] == [2 ** int(p[1]) for p in levels]
    assert all(p.requires_grad for p in backbone.parameters())  # FREEZE_AT -1: nothing frozen
    # An odd-sized image padded as detectron2 pads it gives every level exactly H / stride.
    images = ImageList.from_tensors([torch.randn(3, 100, 130)], backbone.size_divisibility)
    assert images.tensor.shape[-2:] == (128, 160)
    features = backbone(images.tensor)
    for p, spec in backbone.output_shape().items():  # p2-p5 exact; p6/p7 of a stride-32 padding round up
        H, W = images.tensor.shape[-2:]
        assert features[p].shape == (1, 16, -(-H // spec.stride), -(-W // spec.stride))
    sum(f.sum() for f in features.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in backbone.bottom_up.parameters())


def test_swin_config_errors_are_config_errors():
    with pytest.raises(ConfigError, match="APE"):
        build_backbone(build_config("retinanet-swint-3x", SMALL_SWIN + ["MODEL.SWINT.APE=True"],
                                    device="cpu", resolve_dataset=False))
    with pytest.raises(ConfigError, match="MODEL.FPN.IN_FEATURES"):
        build_backbone(build_config("retinanet-swint-3x", SMALL_SWIN + ["MODEL.SWINT.OUT_FEATURES=['stage4','stage5']"],
                                    device="cpu", resolve_dataset=False))
    with pytest.raises(ConfigError, match="not divisible by its 3 heads"):
        build_backbone(build_config("retinanet-swint-3x", SMALL_SWIN + ["MODEL.SWINT.NUM_HEADS=[3,2,2,4]"],
                                    device="cpu", resolve_dataset=False))


@pytest.mark.parametrize("freeze_at, frozen", [(-1, []), (0, []), (1, ["patch_embed"]),
                                               (2, ["patch_embed", "layers.0"]), (3, ["patch_embed", "layers.0", "layers.1"])])
def test_swin_freeze_at(freeze_at, frozen):
    trunk = _small_swin(freeze_at=freeze_at).train()
    for name, p in trunk.named_parameters():
        assert p.requires_grad == (not any(name.startswith(f + ".") for f in frozen)), name
    modes = {name: m.training for name, m in trunk.named_modules() if name in ("patch_embed", "layers.0", "layers.1", "layers.2")}
    assert modes == {name: name not in frozen for name in modes}


def test_drop_path_is_linear_and_off_in_eval():
    trunk = _small_swin(drop_path_rate=0.9)
    rates = [block.drop_path.p for stage in trunk.layers for block in stage.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.9) and rates == sorted(rates)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        trunk.eval()
        first, second = trunk(x)["stage5"], trunk(x)["stage5"]
        torch.manual_seed(0)
        trunk.train()
        trained = trunk(x)["stage5"]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.allclose(first, trained)


@pytest.mark.parametrize("freeze_at", [0, 2])
def test_activation_checkpointing_gives_the_same_outputs_and_gradients(freeze_at):
    # Drop-path on: the recomputed forward must draw the same per-sample masks.
    plain = _small_swin(drop_path_rate=0.5, freeze_at=freeze_at).train()
    checkpointed = _small_swin(drop_path_rate=0.5, freeze_at=freeze_at, use_checkpoint=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 50, 70)
    calls = []
    checkpointed.layers[-1].blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    results = []
    for trunk in (plain, checkpointed):
        torch.manual_seed(0)
        inputs = x.clone().requires_grad_()
        out = trunk(inputs)
        sum((f * torch.linspace(-1, 1, f.numel()).view_as(f)).sum() for f in out.values()).backward()
        grads = {n: p.grad for n, p in trunk.named_parameters() if p.grad is not None}
        results.append((out, grads, inputs.grad))
    (out_a, grads_a, in_a), (out_b, grads_b, in_b) = results
    assert len(calls) == 2  # forward, then recomputed in backward: checkpointing is on
    assert out_a.keys() == out_b.keys() and grads_a.keys() == grads_b.keys() and grads_a
    for name in out_a:
        torch.testing.assert_close(out_b[name], out_a[name], rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(in_b, in_a, rtol=1e-6, atol=1e-7)


def test_use_checkpoint_is_read_from_the_config():
    cfg = build_config("retinanet-swint-3x", SMALL_SWIN + ["MODEL.SWINT.USE_CHECKPOINT=True"], device="cpu",
                       resolve_dataset=False)
    assert all(stage.use_checkpoint for stage in build_backbone(cfg).bottom_up.layers)
    assert not build_config("retinanet-swint-3x", device="cpu", resolve_dataset=False).MODEL.SWINT.USE_CHECKPOINT


# --- DCNv2 and X-101 ---------------------------------------------------------------------------

@pytest.mark.parametrize("modulated", [True, False])
def test_deformable_block_gradients_on_cpu(modulated):
    torch.manual_seed(0)
    block = DeformBottleneckBlock(16, 32, bottleneck_channels=8, stride=2, norm="BN",
                                  deform_modulated=modulated, deform_num_groups=1)
    assert isinstance(block.conv2, ModulatedDeformConv if modulated else DeformConv)
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    (block(x) * torch.randn(2, 32, 6, 6)).sum().backward()
    offset_grad = block.conv2_offset.weight.grad
    assert offset_grad.shape[0] == (27 if modulated else 18)
    for grad in (offset_grad[:18], block.conv2.weight.grad, block.conv1.weight.grad, x.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    if modulated:  # the mask channels (sigmoid of the last 9 offset-conv outputs) learn too
        assert offset_grad[18:].abs().sum() > 0


def test_deformable_conv_with_zero_offsets_is_a_plain_conv():
    conv = ModulatedDeformConv(4, 6, kernel_size=3, padding=1, bias=True)
    x = torch.randn(1, 4, 7, 7)
    offset, mask = torch.zeros(1, 18, 7, 7), torch.ones(1, 9, 7, 7)
    torch.testing.assert_close(conv(x, offset, mask), torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1),
                               atol=1e-5, rtol=1e-5)


def test_x101_dcn_fpn_backbone_builds_and_matches_torchvision_resnext():
    cfg = build_config("retinanet-x101-dcn-2x", device="cpu", resolve_dataset=False)
    with torch.device("meta"):
        backbone = build_backbone(cfg)
        reference = torchvision.models.resnext101_32x8d()
    trunk = backbone.bottom_up
    deform = {name for name, m in trunk.named_modules() if isinstance(m, ModulatedDeformConv)}
    assert len(deform) == 4 + 23 + 3 and not any(name.startswith(("stem", "res2")) for name in deform)
    assert trunk.res3[0].conv2.groups == 32 and trunk.res2[0].conv2.weight.shape[0] == 256  # 32 groups x 8
    assert trunk.res3[0].conv1.stride == (1, 1) and trunk.res3[0].conv2.stride in (2, (2, 2))  # STRIDE_IN_1X1 False
    assert list(backbone.output_shape()) == ["p3", "p4", "p5", "p6", "p7"]
    # Every tensor of torchvision's ResNeXt-101 32x8d has its place and shape in ours; only DCN offsets are extra.
    renamed, dropped, unknown = torchvision_resnet_to_detectron2(reference.state_dict())
    ours = {"backbone.bottom_up." + k: v for k, v in trunk.state_dict().items()}
    assert not unknown and set(dropped) >= {"fc.weight", "fc.bias"}
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {
        k: tuple(v.shape) for k, v in ours.items() if "conv2_offset" not in k}
    assert sum("conv2_offset" in k for k in ours) == 2 * 30
    frozen = [n for n, p in trunk.named_parameters() if not p.requires_grad]
    assert all(n.startswith(("stem.", "res2.")) for n in frozen)  # FREEZE_AT 2


# --- MODEL.WEIGHTS -------------------------------------------------------------------------------

TV_SET = [f"{k}={v}" for k, v in TORCHVISION_INPUT.items()]


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """torchvision resnet18 with random weights and non-trivial BatchNorm statistics, saved as a .pth."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(std=0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(std=0.1)
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model, path


def _r18_student(weights, extra=()):
    cfg = build_config("demo", [f"MODEL.WEIGHTS={weights}", "MODEL.FPN.OUT_CHANNELS=16", "MODEL.RETINANET.NORM=",
                                "MODEL.RESNETS.NORM=FrozenBN", *extra], device="cpu", resolve_dataset=False)
    return cfg, build_model(cfg).eval()


def test_torchvision_resnet_weights_give_torchvision_features(resnet18_file):
    tv, path = resnet18_file
    cfg, student = _r18_student(path, TV_SET)
    report = load_pretrained_weights(student, cfg)
    assert report.source == "torchvision ResNet" and report.missing == [] and report.unexpected == []
    assert {"fc.weight", "fc.bias"} <= set(report.dropped)
    image = torch.rand(1, 3, 96, 128) * 255  # RGB, 0-255, as detectron2 feeds the model
    with torch.no_grad():
        ours = student.backbone.bottom_up((image - student.pixel_mean) / student.pixel_std)["res5"]
        x = torchvision.transforms.functional.normalize(image / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        theirs = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_torchvision_weights_with_the_wrong_input_config_are_refused(resnet18_file):
    _, path = resnet18_file
    cfg, student = _r18_student(path)  # detectron2's BGR defaults
    with pytest.raises(CheckpointError, match="torchvision ResNet weights.*INPUT.FORMAT, MODEL.PIXEL_MEAN, MODEL.PIXEL_STD") as info:
        load_pretrained_weights(student, cfg)
    assert "--set INPUT.FORMAT=RGB" in info.value.hint and "--set MODEL.PIXEL_STD=[58.395,57.12,57.375]" in info.value.hint


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    cfg, student = _r18_student(path, TV_SET)
    with pytest.raises(CheckpointError, match="does not fit the model: .* differ in shape"):
        load_pretrained_weights(student, cfg)
    other = tmp_path / "other.pth"
    torch.save({"model": {"encoder.weight": torch.zeros(3)}}, other)
    with pytest.raises(CheckpointError, match="matches the ResNet backbone of this model"):
        load_pretrained_weights(student, cfg, str(other))


@pytest.mark.parametrize("weights, message", [
    ("detectron2://ImageNetPretrained/MSRA/R-50.pkl", "is a URL"),
    ("no/such/R-50.pkl", "does not exist"),
])
def test_unreachable_weights_are_a_clear_error(weights, message, tmp_path, monkeypatch):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path))
    cfg, student = _r18_student("")
    with pytest.raises(CheckpointError, match=message) as info:
        load_pretrained_weights(student, cfg, weights)
    assert "--set MODEL.WEIGHTS=" in info.value.hint


def test_cached_detectron2_download_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path))
    cached = tmp_path / "detectron2/ImageNetPretrained/MSRA/R-18.pkl"
    cached.parent.mkdir(parents=True)
    stem = np.random.default_rng(0).standard_normal((64, 3, 7, 7)).astype(np.float32)
    with open(cached, "wb") as f:  # Caffe2 names, as the MSRA files hold them
        pickle.dump({"conv1_w": stem, "res_conv1_bn_s": np.ones(64, np.float32), "res_conv1_bn_b": np.zeros(64, np.float32),
                     "fc1000_w": np.zeros((1000, 512), np.float32)}, f)
    cfg, student = _r18_student("")
    report = load_pretrained_weights(student, cfg, "detectron2://ImageNetPretrained/MSRA/R-18.pkl")
    assert report.source == "Caffe2 .pkl" and report.path == cached
    assert report.loaded == ["backbone.bottom_up.stem.conv1.norm.bias", "backbone.bottom_up.stem.conv1.norm.weight",
                             "backbone.bottom_up.stem.conv1.weight"]
    assert "fc1000.weight" in report.dropped and report.unexpected == []
    assert len(report.missing) > 0  # the stages: warned about, not an error
    torch.testing.assert_close(student.backbone.bottom_up.stem.conv1.weight, torch.from_numpy(stem))


def test_detector_weights_load_except_a_head_of_another_class_count(tmp_path):
    _, source = _r18_student("")
    path = tmp_path / "detector.pth"
    torch.save({"model": source.state_dict()}, path)
    cfg, student = _r18_student(path, ["MODEL.RETINANET.NUM_CLASSES=3"])
    report = load_pretrained_weights(student, cfg)
    assert sorted(report.other_shape) == ["head.cls_score.bias", "head.cls_score.weight"]
    assert report.missing == [] and report.unexpected == []
    torch.testing.assert_close(student.backbone.bottom_up.res5[1].conv2.weight, source.backbone.bottom_up.res5[1].conv2.weight)
    torch.testing.assert_close(student.head.bbox_pred.weight, source.head.bbox_pred.weight)
