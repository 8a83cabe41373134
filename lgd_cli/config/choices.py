"""The values each choice-valued config key may take: read by build_config's check and by the code that uses the key.

Plain tuples, no heavy imports: modeling, data and engine modules take their rule names from here,
so a value the check accepts is one the model knows.
"""
from __future__ import annotations

from typing import NamedTuple

# lgd's choices where it departs from the official code (docs/method.md §10): the first value is the official rule.
BOX_CLAMPS = ("reference", "image")  # MODEL.DISTILLATOR.LABEL_ENCODER.BOX_CLAMP
EMPTY_IMAGE_RULES = ("reference", "context")  # MODEL.DISTILLATOR.LABEL_ENCODER.EMPTY_IMAGE
CELL_MAPPINGS = ("reference", "stride")  # MODEL.DISTILLATOR.TEACHER.CELL_MAPPING
LOSS_NORMALIZER_RULES = ("reference", "per_step")  # MODEL.DISTILLATOR.TEACHER.LOSS_NORMALIZER

DISTILL_GATES = ("always", "teacher_better")  # MODEL.DISTILLATOR.DISTILL_GATE; "always" is the method
INTERACT_PATTERNS = ("stuGuided", "labelGuided", "student_fill", "teacher_fill")  # the reference's names
CATEGORY_FORMATS = ("one_hot", "norm_classes")  # MODEL.DISTILLATOR.LABEL_ENCODER.CATEGORY_FORMAT
BAD_BOX_POLICIES = ("clip", "drop", "error")  # LGD.DATA.BAD_BOXES (--bad-boxes)
DATA_SOURCES = ("synthetic", "coco", "custom")  # LGD.DATA.SOURCE
OPTIMIZERS = ("SGD", "AdamW")  # each solver block's OPTIMIZER, compared in any case
LR_SCHEDULERS = ("WarmupMultiStepLR", "WarmupCosineLR")  # each block's LR_SCHEDULER_NAME (detectron2's names)
WARMUP_METHODS = ("linear", "constant")  # each block's WARMUP_METHOD
# SOLVER.AMP.DTYPE, any case -> the torch dtype it names.
AMP_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}

_BLOCKS = ("MODEL.DISTILLATOR.STUDENT.SOLVER", "MODEL.DISTILLATOR.TEACHER.SOLVER")
_DEPARTURE = "see docs/method.md, 'Differences from the official code'"


class Choice(NamedTuple):
    values: tuple[str, ...]  # what the key accepts
    shown: tuple[str, ...]  # what a message lists (aliases left out)
    any_case: bool = False
    hint: str | None = None


def _choice(values: tuple[str, ...], **kwargs) -> Choice:
    return Choice(values, values, **kwargs)


# Every choice-valued key build_config checks.
CHOICES: dict[str, Choice] = {
    "MODEL.DISTILLATOR.DISTILL_GATE": _choice(DISTILL_GATES),
    "MODEL.DISTILLATOR.TEACHER.INTERACT_PATTERN": _choice(INTERACT_PATTERNS),
    "MODEL.DISTILLATOR.LABEL_ENCODER.CATEGORY_FORMAT": _choice(CATEGORY_FORMATS),
    "MODEL.DISTILLATOR.LABEL_ENCODER.BOX_CLAMP": _choice(BOX_CLAMPS, hint=_DEPARTURE),
    "MODEL.DISTILLATOR.LABEL_ENCODER.EMPTY_IMAGE": _choice(EMPTY_IMAGE_RULES, hint=_DEPARTURE),
    "MODEL.DISTILLATOR.TEACHER.CELL_MAPPING": _choice(CELL_MAPPINGS, hint=_DEPARTURE),
    "MODEL.DISTILLATOR.TEACHER.LOSS_NORMALIZER": _choice(LOSS_NORMALIZER_RULES, hint=_DEPARTURE),
    "LGD.DATA.BAD_BOXES": _choice(BAD_BOX_POLICIES),
    "LGD.DATA.SOURCE": _choice(DATA_SOURCES),
    "SOLVER.AMP.DTYPE": Choice(tuple(AMP_DTYPES), tuple(dict.fromkeys(AMP_DTYPES.values())), any_case=True),
    **{f"{block}.OPTIMIZER": _choice(OPTIMIZERS, any_case=True) for block in _BLOCKS},
    **{f"{block}.LR_SCHEDULER_NAME": _choice(LR_SCHEDULERS) for block in _BLOCKS},
    **{f"{block}.WARMUP_METHOD": _choice(WARMUP_METHODS) for block in _BLOCKS},
}

# The command-line option that sets a key, named in its message.
OPTION_OF_KEY = {"LGD.DATA.BAD_BOXES": "--bad-boxes"}
