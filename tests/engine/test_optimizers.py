"""Each optimiser's LR schedule, built from its own solver block, is detectron2's schedule of that block."""
import pytest
import torch
from detectron2.solver import build_lr_scheduler as detectron2_lr_scheduler

from lgd_cli.config.build import build_config
from lgd_cli.config.defaults import IGNORED_SOLVER_KEYS
from lgd_cli.engine.optimizers import build_optimizers

TEACHER_DIFFERS = ["MODEL.DISTILLATOR.TEACHER.SOLVER.GAMMA=0.5", "MODEL.DISTILLATOR.TEACHER.SOLVER.WARMUP_FACTOR=0.1",
                   "MODEL.DISTILLATOR.TEACHER.SOLVER.BASE_LR=0.002"]
CASES = {
    "multistep, relative schedule": ["SOLVER.MAX_ITER=60", *TEACHER_DIFFERS],
    "multistep, a step past MAX_ITER, constant warm-up": [
        "LGD.RELATIVE_SCHEDULE.ENABLED=False", "SOLVER.MAX_ITER=40", "MODEL.DISTILLATOR.STUDENT.SOLVER.STEPS=(10,50)",
        "MODEL.DISTILLATOR.STUDENT.SOLVER.WARMUP_ITERS=5", "MODEL.DISTILLATOR.TEACHER.SOLVER.WARMUP_ITERS=100",
        "MODEL.DISTILLATOR.TEACHER.SOLVER.WARMUP_METHOD=constant", *TEACHER_DIFFERS],
    "cosine": ["SOLVER.MAX_ITER=60", "MODEL.DISTILLATOR.STUDENT.SOLVER.LR_SCHEDULER_NAME=WarmupCosineLR",
               "MODEL.DISTILLATOR.TEACHER.SOLVER.LR_SCHEDULER_NAME=WarmupCosineLR", *TEACHER_DIFFERS],
}


class _TwoParts:
    """What build_optimizers reads of an LGDDistiller: the two parameter sets."""

    teacher = object()

    def student_parameters(self):
        return [torch.nn.Parameter(torch.zeros(3))]

    def teacher_parameters(self):
        return [torch.nn.Parameter(torch.zeros(3))]


def _lrs(scheduler, steps):
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()  # (no gradients: nothing moves; torch wants it before the scheduler's step)
        scheduler.step()
    return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_each_schedule_is_detectron2s_for_its_block(case, optimizer):
    sets = [f"MODEL.DISTILLATOR.{who}.SOLVER.OPTIMIZER={optimizer}" for who in ("STUDENT", "TEACHER")]
    cfg = build_config("demo", sets + CASES[case], device="cpu", resolve_dataset=False)
    optimizers, schedulers = build_optimizers(cfg, _TwoParts())
    assert set(schedulers) == {"student", "teacher"}
    seen = {}
    for name, block in (("student", cfg.MODEL.DISTILLATOR.STUDENT.SOLVER), ("teacher", cfg.MODEL.DISTILLATOR.TEACHER.SOLVER)):
        # The equivalent detectron2 config: the block's keys where detectron2 reads them.
        view = cfg.clone()
        view.defrost()
        for key in set(IGNORED_SOLVER_KEYS) - {"NESTEROV"}:
            view.SOLVER[key] = block[key]
        reference = detectron2_lr_scheduler(view, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=block.BASE_LR))
        assert type(optimizers[name]).__name__.lower().startswith(optimizer.lower())
        steps = cfg.SOLVER.MAX_ITER  # (fvcore refuses a step past the end)
        seen[name] = _lrs(schedulers[name], steps)
        assert seen[name] == _lrs(reference, steps), name
    assert seen["student"] != seen["teacher"]  # each block's own keys, not one shared SOLVER
