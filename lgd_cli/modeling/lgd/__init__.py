"""LGD teacher modules in plain PyTorch: no detectron2, no config (LGD-METHOD.md §2-6)."""
from .appearance_embedding import AppearanceEmbedding
from .box_masks import box_cell_masks, instance_cell_masks
from .distill_loss import DistillationLoss, instance_norm
from .knowledge_mapper import KnowledgeMapper
from .label_encoder import LabelEncoder
from .object_batch import ObjectBatch, pack_objects
from .relation_adapter import RelationAdapter

__all__ = [
    "AppearanceEmbedding",
    "DistillationLoss",
    "KnowledgeMapper",
    "LabelEncoder",
    "ObjectBatch",
    "RelationAdapter",
    "box_cell_masks",
    "instance_cell_masks",
    "instance_norm",
    "pack_objects",
]
