"""The two optimisers of LGD and their LR schedules, built with detectron2's solver helpers (docs/method.md §7)."""
from __future__ import annotations

import torch
from detectron2.config import CfgNode
from detectron2.solver import build_lr_scheduler
from detectron2.solver.build import maybe_add_gradient_clipping


def _solver_view(cfg: CfgNode, block: CfgNode) -> CfgNode:
    """cfg with SOLVER's schedule keys replaced by one optimiser's block, for detectron2's builders."""
    view = cfg.clone()
    view.defrost()
    for key in ("BASE_LR", "MOMENTUM", "WEIGHT_DECAY", "LR_SCHEDULER_NAME", "STEPS", "GAMMA",
                "WARMUP_FACTOR", "WARMUP_ITERS", "WARMUP_METHOD"):
        view.SOLVER[key] = block[key]
    return view


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
        schedulers[name] = build_lr_scheduler(_solver_view(cfg, block), optimizers[name])
    return optimizers, schedulers
