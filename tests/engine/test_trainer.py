"""LGDTrainer and its hooks: backbone-freeze and distillation windows, two optimisers, saved state."""
import itertools

import pytest
import torch

from lgd_cli.engine.hooks import distillation_active
from lgd_cli.engine.trainer import NonFiniteLossError
from tests.helpers import make_trainer


@pytest.mark.parametrize("iteration, expected", [(0, False), (29999, False), (30000, True), (130000, True),
                                                 (130001, False), (179999, False)])
def test_distillation_window_is_the_references_rule(iteration, expected):
    assert distillation_active(iteration, pre=30000, post=50000, max_iter=180000) is expected


def snapshot(params):
    return [p.detach().clone() for p in params]


def test_bottom_up_backbone_frozen_during_the_window_then_trains(tiny_overrides):
    cfg, model, trainer = make_trainer(tiny_overrides, "LGD.RELATIVE_SCHEDULE.ENABLED=False",
                                       "MODEL.DISTILLATOR.PRE_FREEZE_STUDENT_BACKBONE_ITERS=2",
                                       "MODEL.DISTILLATOR.PRE_NONDISTILL_ITERS=0", "SOLVER.MAX_ITER=3")
    bottom_up = model.frozen_backbone_parameters()
    fpn = [p for n, p in model.student.backbone.named_parameters() if not n.startswith("bottom_up.")]
    before_bu, before_fpn = snapshot(bottom_up), snapshot(fpn)
    trainer.train(0, 2)  # iterations 0 and 1: inside the window
    assert all(torch.equal(a, b) for a, b in zip(before_bu, bottom_up))
    assert not all(torch.equal(a, b) for a, b in zip(before_fpn, fpn))
    # No optimiser state (momentum, Adam moments) for frozen parameters: no gradient at all, not zero.
    state = trainer.optimizers["student"].state
    assert all(not state.get(p) for p in bottom_up)
    assert any(state.get(p) for p in fpn)
    trainer.train(2, 3)  # iteration 2: after the window
    assert not all(torch.equal(a, b) for a, b in zip(before_bu, bottom_up))


def test_two_optimisers_own_disjoint_parameters_and_schedules(tiny_overrides):
    cfg, model, trainer = make_trainer(tiny_overrides, "MODEL.DISTILLATOR.TEACHER.SOLVER.BASE_LR=0.002")
    student = {id(p) for g in trainer.optimizers["student"].param_groups for p in g["params"]}
    teacher = {id(p) for g in trainer.optimizers["teacher"].param_groups for p in g["params"]}
    assert not student & teacher
    assert student | teacher == {id(p) for p in model.parameters()}
    wd = cfg.MODEL.DISTILLATOR.STUDENT.SOLVER.WEIGHT_DECAY
    assert all(g["weight_decay"] == wd for g in trainer.optimizers["student"].param_groups)
    trainer.train(0, 2)
    lr = {k: o.param_groups[0]["lr"] for k, o in trainer.optimizers.items()}
    # Same warm-up and steps, different bases: the LRs stay in the ratio of the bases.
    assert lr["teacher"] / lr["student"] == pytest.approx(0.002 / cfg.MODEL.DISTILLATOR.STUDENT.SOLVER.BASE_LR)


def test_trainer_state_round_trips_iteration_optimisers_and_schedules(tiny_overrides):
    _, _, trainer = make_trainer(tiny_overrides)
    trainer.train(0, 3)
    state = trainer.state_dict()
    _, _, fresh = make_trainer(tiny_overrides)
    fresh.load_state_dict(state)
    assert fresh.iter == trainer.iter
    hook = fresh._hooks[0]
    assert hook.schedulers["student"].last_epoch == trainer._hooks[0].schedulers["student"].last_epoch
    assert fresh.optimizers["teacher"].state_dict()["state"].keys() == trainer.optimizers["teacher"].state_dict()["state"].keys()


def test_non_finite_loss_names_iteration_and_terms(tiny_overrides):
    _, model, trainer = make_trainer(tiny_overrides)
    forward = model.forward

    def poisoned(batch):
        losses = forward(batch)
        losses["loss_distill"] = losses["loss_distill"] * float("nan")
        return losses

    model.forward = poisoned
    with pytest.raises(NonFiniteLossError, match=r"iteration 0: loss_distill \(distillation\) = nan"):
        trainer.train(0, 2)


def _poison_at(model, iterations_calls):
    """Make the distillation loss NaN on the given forward calls (0-based), counting every call."""
    forward, calls = model.forward, itertools.count()

    def poisoned(batch):
        losses = forward(batch)
        if next(calls) in iterations_calls:
            losses["loss_distill"] = losses["loss_distill"] * float("nan")
        return losses

    model.forward = poisoned


def test_skip_nonfinite_skips_batches_without_a_step_then_fails(tiny_overrides, caplog):
    _, model, trainer = make_trainer(tiny_overrides)
    trainer.skip_nonfinite = 2
    _poison_at(model, {1, 2, 4})  # iteration 1 needs three batches; iteration 2 hits the third bad one
    weights = snapshot(model.parameters())
    steps = []
    trainer.optimizers["student"].register_step_post_hook(lambda *_: steps.append(trainer.iter))
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train(0, 4)
    assert steps == [0, 1]  # one step per iteration, none for a skipped batch
    assert trainer.nonfinite_skipped == 2 and not all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    message = info.value.message
    assert message.startswith("non-finite loss at iteration 2: loss_distill (distillation) = nan")
    assert "after skipping 2 such batches, the --skip-nonfinite limit" in message and "no checkpoint written yet" in message
    assert "BASE_LR" in info.value.hint
    err = "\n".join(r.getMessage() for r in caplog.records if r.name == "lgd_cli" and r.levelname == "WARNING")
    assert "iteration 1: non-finite loss loss_distill (distillation) = nan; batch skipped" in err
    assert "(2 of --skip-nonfinite 2)" in err


def test_skipped_count_survives_a_checkpoint(tiny_overrides):
    _, model, trainer = make_trainer(tiny_overrides)
    trainer.skip_nonfinite = 1
    _poison_at(model, {0})
    trainer.train(0, 1)
    _, _, fresh = make_trainer(tiny_overrides)
    fresh.load_state_dict(trainer.state_dict())
    assert fresh.nonfinite_skipped == 1


@pytest.mark.parametrize("window", [
    ["LGD.RELATIVE_SCHEDULE.ENABLED=False", "MODEL.DISTILLATOR.PRE_NONDISTILL_ITERS=1",
     "MODEL.DISTILLATOR.POST_NONDISTILL_ITERS=3"],
    # The demo's way: fractions of MAX_ITER (1/6 and 1/2 of 6 iterations).
    ["LGD.RELATIVE_SCHEDULE.PRE_NONDISTILL=0.1667", "LGD.RELATIVE_SCHEDULE.POST_NONDISTILL=0.5"],
])
def test_last_iterations_of_a_run_with_a_post_window_do_not_distil(tiny_overrides, window):
    """POST_NONDISTILL_ITERS = 3 of 6: iterations 4 and 5 (> MAX_ITER - POST, the reference's rule)
    train without distillation, as iteration 0 (< PRE = 1) does; the flag is logged every step."""
    cfg, model, trainer = make_trainer(tiny_overrides, "SOLVER.MAX_ITER=6", *window)
    assert (cfg.MODEL.DISTILLATOR.PRE_NONDISTILL_ITERS, cfg.MODEL.DISTILLATOR.POST_NONDISTILL_ITERS) == (1, 3)
    seen = []
    forward = model.forward
    model.forward = lambda batch: (seen.append(model.distill_active), forward(batch))[1]
    trainer.train(0, 6)
    assert seen == [False, True, True, True, False, False]
    logged = trainer.storage.history("distill_active").values()
    assert [(int(iteration), value) for value, iteration in logged] == list(enumerate([0.0, 1.0, 1.0, 1.0, 0.0, 0.0]))
