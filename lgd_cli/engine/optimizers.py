"""The two optimisers of LGD and their LR schedules, built with detectron2's solver helpers (docs/method.md §7)."""
from __future__ import annotations

import logging

import torch
from detectron2.config import CfgNode
from detectron2.solver import LRMultiplier, WarmupParamScheduler
from detectron2.solver.build import maybe_add_gradient_clipping
from fvcore.common.param_scheduler import CosineParamScheduler, MultiStepParamScheduler

logger = logging.getLogger(__name__)


def build_optimizer(cfg: CfgNode, block: CfgNode, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """One optimiser: every parameter gets the block's LR and weight decay (no norm/bias exemption).

    Gradient clipping (SOLVER.CLIP_GRADIENTS) wraps it as in detectron2, so each optimiser
    clips its own parameters before stepping.
    """
    params = [p for p in params if p.requires_grad]
    if block.OPTIMIZER.upper() == "SGD":
        optimizer = torch.optim.SGD(params, lr=block.BASE_LR, momentum=block.MOMENTUM,
                                    weight_decay=block.WEIGHT_DECAY, nesterov=False)
    else:  # AdamW (checked by build_config)
        optimizer = torch.optim.AdamW(params, lr=block.BASE_LR, betas=(0.9, 0.999), weight_decay=block.WEIGHT_DECAY)
    return maybe_add_gradient_clipping(cfg, optimizer)


def build_lr_scheduler(block: CfgNode, max_iter: int, optimizer: torch.optim.Optimizer) -> LRMultiplier:
    """One optimiser's schedule from its solver block: what detectron2's build_lr_scheduler builds
    from SOLVER for WarmupMultiStepLR / WarmupCosineLR, over `max_iter` iterations."""
    if block.LR_SCHEDULER_NAME == "WarmupMultiStepLR":
        steps = [step for step in block.STEPS if step <= max_iter]
        if len(steps) != len(block.STEPS):
            logger.warning("STEPS of a solver block contains values larger than SOLVER.MAX_ITER: they are ignored")
        schedule = MultiStepParamScheduler(values=[block.GAMMA ** k for k in range(len(steps) + 1)],
                                           milestones=steps, num_updates=max_iter)
    else:  # WarmupCosineLR (checked by build_config)
        schedule = CosineParamScheduler(1, 0)
    schedule = WarmupParamScheduler(schedule, block.WARMUP_FACTOR, min(block.WARMUP_ITERS / max_iter, 1.0),
                                    block.WARMUP_METHOD)
    return LRMultiplier(optimizer, multiplier=schedule, max_iter=max_iter)


def build_optimizers(cfg: CfgNode, model) -> tuple[dict, dict]:
    """Optimisers and LR schedulers keyed "student" (detector + adapter) and "teacher".

    Args:
        model: an LGDDistiller (not wrapped in DDP).

    Returns:
        ({name: optimizer}, {name: scheduler}); no teacher entry for the baseline.
    """
    d = cfg.MODEL.DISTILLATOR
    groups = {"student": (d.STUDENT.SOLVER, model.student_parameters())}
    if model.teacher is not None:
        groups["teacher"] = (d.TEACHER.SOLVER, model.teacher_parameters())
    optimizers, schedulers = {}, {}
    for name, (block, params) in groups.items():
        optimizers[name] = build_optimizer(cfg, block, params)
        schedulers[name] = build_lr_scheduler(block, cfg.SOLVER.MAX_ITER, optimizers[name])
    return optimizers, schedulers
