"""LGD teacher modules in plain PyTorch: no detectron2, no config (docs/method.md §2-6)."""
from .appearance_embedding import AppearanceEmbedding
from .box_masks import CELL_MAPPINGS, box_cell_masks, level_scales
from .distill_loss import DistillationLoss, instance_norm
from .knowledge_mapper import KnowledgeMapper
from .label_encoder import LabelEncoder
from .object_batch import BOX_CLAMPS, EMPTY_IMAGE_RULES, ObjectBatch, pack_objects
from .relation_adapter import RelationAdapter

__all__ = [
    "AppearanceEmbedding",
    "BOX_CLAMPS",
    "CELL_MAPPINGS",
    "DistillationLoss",
    "EMPTY_IMAGE_RULES",
    "KnowledgeMapper",
    "LabelEncoder",
    "ObjectBatch",
    "RelationAdapter",
    "box_cell_masks",
    "instance_norm",
    "level_scales",
    "pack_objects",
]
