"""The implicit teacher: ground-truth labels + student features -> FPN-shaped maps (docs/method.md §2-5)."""
from __future__ import annotations

from torch import Tensor, nn

from .appearance_embedding import AppearanceEmbedding
from .box_masks import CELL_MAPPINGS, box_cell_masks, level_scales
from .knowledge_mapper import KnowledgeMapper
from .label_encoder import LabelEncoder
from .object_batch import ObjectBatch
from .relation_adapter import RelationAdapter


class ImplicitTeacher(nn.Module):
    """Label encoder -> relation adapter (with appearance embeddings) -> knowledge mapper.

    Everything here is dropped after training; it is what the teacher optimiser trains.

    Args:
        num_classes: K, classes of the one-hot descriptor.
        channels: C, the student's FPN width.
        add_context_box: the objects carry one whole-image context slot per image.
        detach_appearance: stop teacher gradients from reaching the student features.
        interact_pattern: stuGuided | labelGuided | student_fill | teacher_fill.
        num_heads: attention heads of the relation adapter (C must divide by it).
        category_format: one_hot | norm_classes.
        use_mask_crops: append the 7x7 instance-mask crop to each descriptor.
        cell_mapping: how boxes land on each level's cells, one of CELL_MAPPINGS.
    """

    def __init__(self, *, num_classes: int, channels: int, add_context_box: bool, detach_appearance: bool,
                 interact_pattern: str = "stuGuided", num_heads: int = 8, category_format: str = "one_hot",
                 use_mask_crops: bool = False, cell_mapping: str = "reference"):
        super().__init__()
        if cell_mapping not in CELL_MAPPINGS:
            raise ValueError(f"cell_mapping must be one of {CELL_MAPPINGS}, got {cell_mapping!r}")
        self.add_context_box = add_context_box
        self.cell_mapping = cell_mapping
        self.label_encoder = LabelEncoder(num_classes, channels, category_format, use_mask_crops=use_mask_crops)
        self.appearance = AppearanceEmbedding(channels, detach_features=detach_appearance)
        self.relation = RelationAdapter(channels, num_heads=num_heads, pattern=interact_pattern)
        self.mapper = KnowledgeMapper(channels, add_context_box=add_context_box)

    def forward(self, features: list[Tensor], objects: ObjectBatch, padded_size: tuple[int, int],
                strides: list[int], cell_masks: list[Tensor] | None = None) -> list[Tensor]:
        """
        Args:
            features: L student FPN maps (B, C, H_l, W_l).
            objects: the batch's ground truth as padded slots (B, N).
            padded_size: (H, W) of the padded image batch.
            strides: L level strides in pixels.
            cell_masks: L precomputed (B, N, H_l, W_l) cell masks (e.g. instance-shaped, for
                label maps) used instead of the boxes' for pooling and rendering.

        Returns:
            L teacher maps, each the shape of the matching student map.
        """
        shapes = [tuple(f.shape[-2:]) for f in features]
        # 1. Which cells each object covers, per level: shared by pooling and rendering.
        masks = cell_masks
        if masks is None:
            scales = level_scales(shapes, strides, padded_size, self.cell_mapping)
            masks = box_cell_masks(objects.boxes, objects.include, objects.covers_all, shapes, scales)
        # 2. One label embedding per object, one appearance embedding per object and level.
        labels = self.label_encoder(objects, padded_size)
        appearance = self.appearance(features, masks)
        # 3. Objects of the same image attend to each other, then are painted back per level.
        vectors = self.relation(labels, appearance, objects.include)
        return self.mapper(vectors, masks, objects)
