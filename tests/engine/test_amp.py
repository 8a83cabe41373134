"""Mixed precision (SOLVER.AMP): bf16 autocast on CPU, fp16 with one GradScaler for both optimisers."""
import copy

import pytest
import torch
from detectron2.utils.events import EventStorage

from lgd_cli.config.build import build_config
from lgd_cli.engine.amp import MixedPrecision
from lgd_cli.errors import ConfigError
from lgd_cli.modeling.lgd import DistillationLoss, instance_norm
from lgd_cli.modeling.lgd.relation_adapter import RelationAdapter
from tests.helpers import make_batch, make_trainer

# 128-px images: torch's CPU bf16 convolution gives non-finite weight gradients now and then for
# a 1x1 input map (p6 of a 64-px image, the input of p7's strided conv); GPUs are not affected.
SIZE = 128
AMP = {"bf16": ["SOLVER.AMP.ENABLED=True"], "fp16": ["SOLVER.AMP.ENABLED=True", "SOLVER.AMP.DTYPE=float16"]}


def scaled(trainer):
    """The fp16 step's GradScaler logic on a bf16 forward: fp16 kernels on CPU take seconds a step.
    (tests/test_cuda.py trains in real fp16.)"""
    trainer.amp = MixedPrecision("cpu", True, torch.bfloat16, loss_scaling=True)
    return trainer


def test_config_keys_and_checks(tiny_overrides):
    cfg = build_config("demo", tiny_overrides, device="cpu")
    assert cfg.SOLVER.AMP.ENABLED is False and cfg.SOLVER.AMP.DTYPE == "bfloat16"
    assert MixedPrecision.from_config(cfg).scaler is None
    fp16 = MixedPrecision.from_config(build_config("demo", tiny_overrides + AMP["fp16"], device="cpu"))
    assert fp16.dtype == torch.float16 and fp16.scaler is not None
    with pytest.raises(ConfigError, match="SOLVER.AMP.DTYPE must be bfloat16 or float16"):
        build_config("demo", tiny_overrides + ["SOLVER.AMP.DTYPE=int8"], device="cpu")
    with pytest.raises(ConfigError, match="key parity only") as info:
        build_config("demo", tiny_overrides + ["MODEL.DISTILLATOR.STUDENT.SOLVER.AMP.ENABLED=True"], device="cpu")
    assert "SOLVER.AMP.ENABLED=True" in info.value.hint


def test_bf16_and_fp16_losses_stay_close_to_fp32_on_the_same_batch(tiny_overrides):
    _, model, _ = make_trainer(tiny_overrides, size=SIZE)
    batch = make_batch(seed=1, size=SIZE)
    losses = {}
    for name, amp in (("fp32", MixedPrecision("cpu")), ("bf16", MixedPrecision("cpu", True, torch.bfloat16)),
                      ("fp16", MixedPrecision("cpu", True, torch.float16))):
        twin = copy.deepcopy(model)  # the loss normaliser EMA moves with each forward
        with EventStorage(0), amp.autocast():
            losses[name] = twin(batch)
    for low in ("bf16", "fp16"):
        assert losses["fp32"].keys() == losses[low].keys()
        for key, value in losses[low].items():
            assert value.dtype == torch.float32, key
            torch.testing.assert_close(value, losses["fp32"][key], rtol=0.02, atol=1e-3, msg=f"{low} {key}")


def test_distillation_loss_norms_and_attention_are_fp32_under_autocast():
    torch.manual_seed(0)
    loss = DistillationLoss(16)
    student, teacher = [torch.randn(2, 16, 8, 8)], [torch.randn(2, 16, 8, 8)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert instance_norm(torch.randn(2, 16, 8, 8, dtype=torch.bfloat16)).dtype == torch.float32
        low = loss(student, teacher, detach_student=False)
        adapter = RelationAdapter(16, num_heads=4)
        out = adapter(torch.randn(2, 3, 16), [torch.randn(2, 3, 16)], torch.ones(2, 3, dtype=torch.bool))
    assert low.dtype == torch.float32 and out[0].dtype == torch.float32
    torch.testing.assert_close(low, loss(student, teacher, detach_student=False), rtol=0.02, atol=0)


@pytest.mark.parametrize("precision", ["bf16", "loss-scaled"])
def test_mixed_precision_trains_both_optimisers(tiny_overrides, precision):
    _, model, trainer = make_trainer(tiny_overrides, *AMP["bf16"], size=SIZE)
    if precision == "loss-scaled":
        scaled(trainer)
    before = [p.detach().clone() for p in model.parameters()]
    steps = {"student": 0, "teacher": 0}
    for name, optimizer in trainer.optimizers.items():
        optimizer.register_step_post_hook(lambda *_, name=name: steps.__setitem__(name, steps[name] + 1))
    trainer.train(0, 3)
    assert steps == {"student": 3, "teacher": 3}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(not torch.equal(a, b) for a, b in zip(before, model.parameters())) > len(before) // 2
    assert (trainer.amp.scaler is not None) is (precision == "loss-scaled")


def _max_grad_at_step(trainer):
    seen = []
    trainer.optimizers["student"].register_step_pre_hook(
        lambda opt, *_: seen.append(max(p.grad.abs().max().item() for g in opt.param_groups for p in g["params"]
                                        if p.grad is not None)))
    trainer.train(0, 1)
    return seen[0]


def test_fp16_gradients_are_unscaled_before_the_clipping_step(tiny_overrides):
    clip = ["SOLVER.CLIP_GRADIENTS.ENABLED=True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE=value",
            "SOLVER.CLIP_GRADIENTS.CLIP_VALUE=1.0"]
    fp32 = _max_grad_at_step(make_trainer(tiny_overrides, *clip, size=SIZE)[2])
    trainer = scaled(make_trainer(tiny_overrides, *clip, *AMP["bf16"], size=SIZE)[2])
    assert trainer.amp.scaler.get_scale() == 2.0**16
    fp16 = _max_grad_at_step(trainer)
    # Unscaled (not 65536 times larger) when the optimiser, and so its value clipping, sees them.
    assert fp16 == pytest.approx(fp32, rel=0.1)


def test_an_fp16_overflow_skips_both_optimisers_lowers_the_scale_and_retries(tiny_overrides):
    _, model, trainer = make_trainer(tiny_overrides, *AMP["bf16"], size=SIZE)
    scaled(trainer)
    state = trainer.amp.scaler.state_dict()
    trainer.amp.scaler.load_state_dict({**state, "scale": 2.0**127})  # any gradient overflows fp32
    steps = []
    trainer.optimizers["student"].register_step_post_hook(lambda *_: steps.append(trainer.iter))
    trainer.optimizers["teacher"].register_step_post_hook(lambda *_: steps.append(trainer.iter))
    trainer.train(0, 2)
    assert steps == [0, 0, 1, 1]  # one step of each optimiser per iteration, none for a skipped batch
    assert trainer.amp_skipped >= 1 and trainer.nonfinite_skipped == 0
    assert trainer.amp.scaler.get_scale() < 2.0**127
    assert trainer.storage.history("amp_skipped").latest() == trainer.amp_skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_loss_scale_is_saved_and_restored_with_the_trainer(tiny_overrides):
    trainer = scaled(make_trainer(tiny_overrides, *AMP["bf16"], size=SIZE)[2])
    trainer.amp.scaler.load_state_dict({**trainer.amp.scaler.state_dict(), "scale": 2.0**127})
    trainer.train(0, 2)
    state = trainer.state_dict()
    assert state["grad_scaler"]["scale"] == trainer.amp.scaler.get_scale() and state["amp_skipped"] >= 1
    fresh = scaled(make_trainer(tiny_overrides, *AMP["bf16"], size=SIZE)[2])
    fresh.load_state_dict(state)
    assert fresh.amp.scaler.state_dict() == trainer.amp.scaler.state_dict()
    assert fresh.amp_skipped == trainer.amp_skipped
    # fp32 runs keep their checkpoints as they were: no scaler entry.
    _, _, plain = make_trainer(tiny_overrides, size=SIZE)
    plain.train(0, 1)
    assert "grad_scaler" not in plain.state_dict()
