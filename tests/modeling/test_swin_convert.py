"""`lgd convert-swin-weights`: official and OpenMMLab Swin checkpoints -> our backbone, checked against torchvision.

The source model is torchvision's Swin (an implementation independent of ours) at a reduced width and
depth, with large random weights so that attention, shifts and masks all matter; its weights are
renamed into each published layout, converted, loaded through MODEL.WEIGHTS, and the stage outputs compared.
"""
import re

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import fill_disk_after, run_cli
from torchvision.models.swin_transformer import SwinTransformer as TorchvisionSwin

from lgd_cli.config.build import build_config
from lgd_cli.errors import CheckpointError, ConfigError
from lgd_cli.modeling.backbones.pretrained import load_pretrained_weights
from lgd_cli.modeling.backbones.swin_convert import convert_swin_weights, default_target

ARCH = {"embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 2, 4], "window_size": 3}
SWINT_SET = ["MODEL.SWINT.EMBED_DIM=16", "MODEL.SWINT.DEPTHS=[2,2,2,2]", "MODEL.SWINT.NUM_HEADS=[1,2,2,4]",
             "MODEL.SWINT.WINDOW_SIZE=3", "MODEL.FPN.OUT_CHANNELS=16", "MODEL.RETINANET.NORM="]


@pytest.fixture(scope="module")
def source_model():
    """torchvision Swin with random weights of realistic scale (attention far from uniform)."""
    torch.manual_seed(0)
    model = TorchvisionSwin(patch_size=[4, 4], embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4],
                            window_size=[3, 3], stochastic_depth_prob=0.0, num_classes=10).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif "relative_position_bias_table" in name:
                p.normal_(std=2.0)
            else:
                p.normal_(std=1.0 / (p.shape[-1] if p.ndim > 1 else 16) ** 0.5)
    return model


def official_state(model) -> dict:
    """torchvision's keys renamed to the official microsoft/Swin-Transformer layout (buffers included)."""
    state = {}
    for key, value in model.state_dict().items():
        if m := re.fullmatch(r"features\.0\.([02])\.(\w+)", key):
            key = f"patch_embed.{'proj' if m[1] == '0' else 'norm'}.{m[2]}"
        elif m := re.fullmatch(r"features\.(\d)\.(\d+)\.(.+)", key):
            rest = m[3].replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
            key = f"layers.{(int(m[1]) - 1) // 2}.blocks.{m[2]}.{rest}"
            if rest == "attn.relative_position_index":
                value = value.view(9, 9)
        elif m := re.fullmatch(r"features\.(\d)\.(.+)", key):  # patch merging after stage (i - 2) / 2
            key = f"layers.{(int(m[1]) - 2) // 2}.downsample.{m[2]}"
        state[key] = value.clone()
    for stage in range(4):  # the official classifier stores its shifted-window masks
        state[f"layers.{stage}.blocks.1.attn_mask"] = torch.zeros(4, 9, 9)
    return state


def _unfold_order(C: int) -> list[int]:
    """For each OpenMMLab (nn.Unfold) channel of a 2x2 merge, the official channel holding the same value."""
    ids = torch.arange(4 * C, dtype=torch.float32).view(1, C, 2, 2)  # a distinct id per (channel, row, col)
    unfold = torch.nn.Unfold(kernel_size=2, stride=2)(ids)[0, :, 0]
    x = ids.permute(0, 2, 3, 1)
    official = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).flatten()
    return [int((official == v).nonzero()) for v in unfold]


def openmmlab_state(official: dict) -> dict:
    """The OpenMMLab (mmcls / mmdet) layout: renamed, prefixed, and patch merging in nn.Unfold channel order."""
    state = {}
    for key, value in official.items():
        if "attn_mask" in key:
            continue
        if ".downsample." in key and key.endswith(("reduction.weight", "norm.weight", "norm.bias")):
            value = value[..., _unfold_order(value.shape[-1] // 4)]
        key = (key.replace("patch_embed.proj.", "patch_embed.projection.").replace("layers.", "stages.")
               .replace("attn.", "attn.w_msa.").replace("mlp.fc1.", "ffn.layers.0.0.").replace("mlp.fc2.", "ffn.layers.1."))
        key = key if key.startswith("head.") else "backbone." + key
        state[key.replace("head.", "head.fc.")] = value
    return state


def _stage_outputs(model, x) -> list[torch.Tensor]:
    outputs, y = [], x
    for i, layer in enumerate(model.features):
        y = layer(y)
        if i % 2 == 1:
            outputs.append(y.permute(0, 3, 1, 2))
    return outputs


def _swin_student(tmp_path, weights, extra=()):
    from detectron2.modeling import build_model

    cfg = build_config("retinanet-swint-3x", SWINT_SET + [f"MODEL.WEIGHTS={weights}", *extra],
                       device="cpu", resolve_dataset=False)
    return cfg, build_model(cfg).eval()


@pytest.mark.parametrize("layout", ["official", "OpenMMLab"])
def test_converted_weights_reproduce_the_source_stages(layout, source_model, tmp_path):
    src = tmp_path / "swin_tiny_patch4_window7_224.pth"
    official = official_state(source_model)
    torch.save({"model": official} if layout == "official" else {"state_dict": openmmlab_state(official),
                                                                   "meta": {"epoch": 300}}, src)
    report = convert_swin_weights(src)
    assert report.target == tmp_path / "swin_tiny_patch4_window7_224_converted.pth" == default_target(src)
    assert report.layout == layout and {k: report.architecture[k] for k in ARCH} == ARCH
    dropped = {key for key, _ in report.dropped}
    assert {"head.weight", "head.bias", "norm.weight", "norm.bias"} <= {k.replace("head.fc.", "head.") for k in dropped}
    assert sum("relative_position_index" in k for k in dropped) == 8

    cfg, student = _swin_student(tmp_path, report.target)
    loaded = load_pretrained_weights(student, cfg)
    assert loaded.missing == [] and loaded.unexpected == [] and len(loaded.loaded) == report.kept
    assert sorted(loaded.fresh) == ["backbone.bottom_up.norm1.bias", "backbone.bottom_up.norm1.weight",
                                    "backbone.bottom_up.norm2.bias", "backbone.bottom_up.norm2.weight",
                                    "backbone.bottom_up.norm3.bias", "backbone.bottom_up.norm3.weight"]
    trunk = student.backbone.bottom_up
    x = torch.randn(2, 3, 128, 192)  # every stage larger than a window; stage2-5 maps padded to whole windows
    with torch.no_grad():
        ours = trunk(x)
        theirs = _stage_outputs(source_model, x)
    for i, name in [(1, "stage3"), (2, "stage4"), (3, "stage5")]:
        norm = getattr(trunk, f"norm{i}")
        expected = F.layer_norm(theirs[i].permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias)
        assert ours[name].shape == expected.permute(0, 3, 1, 2).shape
        torch.testing.assert_close(ours[name], expected.permute(0, 3, 1, 2), atol=1e-5, rtol=1e-4)


def test_unfold_order_is_a_real_reordering():
    # The layouts differ in more than the neighbour order: channels are interleaved.
    assert _unfold_order(2) == [0, 4, 2, 6, 1, 5, 3, 7]


@pytest.mark.parametrize("layout, extra", [("official", "absolute_pos_embed"), ("OpenMMLab", "neck.proj.weight")])
def test_unknown_key_is_refused_by_name(layout, extra, source_model, tmp_path):
    official = official_state(source_model)
    state = official if layout == "official" else openmmlab_state(official)
    state[extra] = torch.zeros(1)
    src = tmp_path / "odd.pth"
    torch.save({"model": state} if layout == "official" else {"state_dict": state}, src)
    with pytest.raises(CheckpointError, match=rf"unexpected key '{re.escape(extra)}' for the {layout} Swin layout"):
        convert_swin_weights(src)
    assert not default_target(src).exists()


def test_files_that_are_not_swin_checkpoints_are_refused(source_model, tmp_path):
    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, resnet)
    with pytest.raises(CheckpointError, match="not a Swin checkpoint in a known layout \\(first key: conv1.weight\\)"):
        convert_swin_weights(resnet)
    incomplete = tmp_path / "incomplete.pth"
    state = official_state(source_model)
    del state["layers.2.blocks.1.mlp.fc2.weight"]
    torch.save({"model": state}, incomplete)
    with pytest.raises(CheckpointError, match="lacks 'layers.2.blocks.1.mlp.fc2.weight'"):
        convert_swin_weights(incomplete)
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_swin_weights(tmp_path / "missing.pth")


def test_weights_refused_when_they_do_not_fit_the_config(source_model, tmp_path):
    src = tmp_path / "swin.pth"
    torch.save({"model": official_state(source_model)}, src)
    cfg, student = _swin_student(tmp_path, src)
    with pytest.raises(CheckpointError, match="original layout") as info:
        load_pretrained_weights(student, cfg)  # not converted yet
    assert f"lgd convert-swin-weights {src}" in info.value.hint
    target = convert_swin_weights(src).target
    cfg, student = _swin_student(tmp_path, target, ["MODEL.SWINT.NUM_HEADS=[1,2,4,4]"])
    with pytest.raises(CheckpointError, match="MODEL.SWINT builds") as info:
        load_pretrained_weights(student, cfg)
    assert info.value.hint == "add --set MODEL.SWINT.NUM_HEADS=[1,2,2,4]"


def test_cli_round_trip(source_model, tmp_path, capsys):
    src = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": official_state(source_model)}, src)
    target = tmp_path / "swin_tiny_patch4_window7_224_converted.pth"

    assert run_cli("convert-swin-weights", str(src)) == 0
    out = capsys.readouterr().out
    assert target.is_file() and f"wrote {len(torch.load(target, weights_only=True)['model'])} tensors" in out
    for dropped in ("head.{weight,bias}", "norm.{weight,bias}", "layers.*.blocks.*.attn.relative_position_index",
                    "layers.*.blocks.*.attn_mask", "ImageNet classifier", "final norm, unused"):
        assert dropped in out
    assert "embed 16, depths 2-2-2-2, heads 1-2-2-4, window 3" in out

    before = target.stat().st_mtime_ns
    assert run_cli("convert-swin-weights", str(src)) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and "Traceback" not in err
    assert target.stat().st_mtime_ns == before
    assert run_cli("convert-swin-weights", str(src), str(target), "--force") == 0
    capsys.readouterr()

    bad = tmp_path / "bad.pth"
    state = official_state(source_model)
    state["absolute_pos_embed"] = torch.zeros(1)
    torch.save({"model": state}, bad)
    assert run_cli("convert-swin-weights", str(bad), str(tmp_path / "out.pth")) == 1
    err = capsys.readouterr().err
    assert "absolute_pos_embed" in err and "Traceback" not in err
    assert not (tmp_path / "out.pth").exists() and not list(tmp_path.glob(".*.tmp"))
    assert run_cli("convert-swin-weights", str(tmp_path / "nope.pth")) == 1
    assert "does not exist" in capsys.readouterr().err


def test_full_disk_is_a_message_naming_the_output_and_leaves_nothing(source_model, tmp_path, capsys, monkeypatch):
    src, target = tmp_path / "swin.pth", tmp_path / "out.pth"
    torch.save({"model": official_state(source_model)}, src)
    fill_disk_after(monkeypatch, torch)
    assert run_cli("convert-swin-weights", str(src), str(target)) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"{target}: No space left on device" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["swin.pth"]


def test_convert_refuses_existing_output_before_reading(tmp_path):
    src, out = tmp_path / "a.pth", tmp_path / "b.pth"
    src.write_bytes(b"not read")
    out.write_bytes(b"keep")
    with pytest.raises(ConfigError, match="already exists"):
        convert_swin_weights(src, out)
    assert out.read_bytes() == b"keep"
