"""On a CUDA GPU (skipped without one; benchmarks/gpu_check.sh runs them): a training step in fp32, bf16
and fp16, an exact resume, an export of a GPU-trained checkpoint, and what Swin checkpointing saves."""
import itertools

import pytest
import torch

from lgd_cli.config.build import build_config
from lgd_cli.engine.amp import MixedPrecision
from lgd_cli.engine.optimizers import build_optimizers
from lgd_cli.engine.train import train
from lgd_cli.modeling.distiller import build_distiller
from lgd_cli.engine.trainer import LGDTrainer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PRECISION = {"fp32": [], "bf16": ["SOLVER.AMP.ENABLED=True"],
             "fp16": ["SOLVER.AMP.ENABLED=True", "SOLVER.AMP.DTYPE=float16"]}
# 128 px: every FPN level at least 1x1 with room (see tests/engine/test_amp.py).
SIZE128 = ["INPUT.MIN_SIZE_TRAIN=(128,)", "INPUT.MAX_SIZE_TRAIN=128", "INPUT.MIN_SIZE_TEST=128", "INPUT.MAX_SIZE_TEST=128"]


@pytest.mark.parametrize("precision", sorted(PRECISION))
def test_training_steps_on_cuda(tiny_overrides, precision):
    from tests.helpers import make_batch

    cfg = build_config("demo", tiny_overrides + SIZE128 + PRECISION[precision], device="cuda")
    torch.manual_seed(0)
    model = build_distiller(cfg)
    assert next(model.parameters()).is_cuda
    optimizers, _ = build_optimizers(cfg, model)
    batches = itertools.cycle([make_batch(seed=i, size=128) for i in range(2)])
    trainer = LGDTrainer(model, batches, optimizers, model.frozen_backbone_parameters(),
                         amp=MixedPrecision.from_config(cfg))
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train(0, 3)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(not torch.equal(a, b) for a, b in zip(before, model.parameters())) > len(before) // 2
    assert (trainer.amp.scaler is not None) is (precision == "fp16")
    losses = trainer.storage.latest()
    assert all(torch.isfinite(torch.tensor(v[0])) for k, v in losses.items() if k.startswith("loss"))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_on_cuda_continues_the_run(tiny_overrides, tmp_path, precision):
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    pairs = tiny_overrides + SIZE128 + PRECISION[precision] + ["SOLVER.MAX_ITER=4", "SOLVER.CHECKPOINT_PERIOD=2"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(build_config("demo", pairs, device="cuda"), whole)
    resumed.mkdir()
    for name in ("model_0000001.pth", "config.yaml"):
        (resumed / name).write_bytes((whole / name).read_bytes())
    (resumed / "last_checkpoint").write_text("model_0000001.pth")
    train(build_config("demo", pairs, device="cuda"), resumed, resume=True)
    a = torch.load(whole / "model_final.pth", weights_only=True)
    b = torch.load(resumed / "model_final.pth", weights_only=True)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == 3
    assert a["trainer"].get("grad_scaler") == b["trainer"].get("grad_scaler")
    # cuDNN in deterministic mode; a few CUDA kernels (index_put, scatter-add) still sum in any order.
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_a_cuda_trained_checkpoint_exports(tiny_overrides, tmp_path):
    from lgd_cli.export import export_checkpoint

    pairs = tiny_overrides + SIZE128 + ["SOLVER.MAX_ITER=2", "SOLVER.CHECKPOINT_PERIOD=2"]
    train(build_config("demo", pairs, device="cuda"), tmp_path)
    result = export_checkpoint(tmp_path / "model_final.pth", "torchscript")
    assert (tmp_path / "model.ts").is_file() and result is not None


def test_swin_activation_checkpointing_saves_memory_on_cuda():
    from lgd_cli.modeling.backbones.swin import SwinTransformer

    peaks = {}
    for use in (False, True):
        torch.manual_seed(0)
        trunk = SwinTransformer(use_checkpoint=use).cuda().train()  # Swin-Tiny
        x = torch.randn(2, 3, 512, 512, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        sum(f.float().mean() for f in trunk(x).values()).backward()
        torch.cuda.synchronize()
        peaks[use] = torch.cuda.max_memory_allocated() - base
        del trunk, x
        torch.cuda.empty_cache()
    assert peaks[True] < 0.6 * peaks[False], peaks


def test_the_lgd_modules_never_wait_for_the_gpu(tiny_overrides):
    """Packing the ground truth, the teacher and the distillation loss queue work without a host sync."""
    from detectron2.structures import Boxes

    from lgd_cli.modeling.lgd import DistillationLoss, pack_objects
    from lgd_cli.modeling.lgd.teacher import ImplicitTeacher

    torch.manual_seed(0)
    teacher = ImplicitTeacher(num_classes=3, channels=32, add_context_box=True, detach_appearance=False).cuda()
    loss = DistillationLoss(32).cuda()
    strides = [8, 16, 32, 64, 128]
    features = [torch.randn(2, 32, 128 // s, 128 // s, device="cuda") for s in strides]
    boxes = [Boxes(torch.tensor([[4.0, 4.0, 60.0, 50.0]], device="cuda")).tensor,
             Boxes(torch.tensor([[10.0, 8.0, 90.0, 120.0], [0.0, 0.0, 30.0, 30.0]], device="cuda")).tensor]
    classes = [torch.tensor([1], device="cuda"), torch.tensor([0, 2], device="cuda")]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        objects = pack_objects(boxes, classes, [(128, 128), (128, 128)], (128, 128), True)
        maps = teacher(features, objects, (128, 128), strides)
        value = loss(features, maps, detach_student=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(value)
