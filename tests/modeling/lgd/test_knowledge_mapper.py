import pytest
import torch

from lgd_cli.modeling.lgd import (AppearanceEmbedding, KnowledgeMapper, LabelEncoder, RelationAdapter,
                                  box_cell_masks, level_scales, pack_objects)

C, K = 16, 3
SHAPES, STRIDES = [(8, 8), (4, 4)], [8, 16]


def _objects(add_context_box, with_boxes=True, empty_image="reference"):
    boxes = [torch.tensor([[0.0, 0.0, 30.0, 20.0], [16.0, 16.0, 60.0, 60.0]]), torch.zeros(0, 4)]
    classes = [torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long)]
    if not with_boxes:
        boxes, classes = [torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2
    return pack_objects(boxes, classes, [(64, 64)] * 2, (64, 64), add_context_box, empty_image=empty_image)


def _masks(objects):
    return box_cell_masks(objects.boxes, objects.include, objects.covers_all, SHAPES,
                          level_scales(SHAPES, STRIDES, (64, 64)))


def _naive_paint(mapper, vectors, mask, painted):
    B, N, H, W = mask.shape
    grid = torch.zeros(B, C, H, W)
    for b in range(B):
        for n in range(N):
            if painted[b, n]:
                grid[b] += mapper.instance_proj(vectors[b, n])[:, None, None] * mask[b, n]
    return grid


@pytest.mark.parametrize("add_context_box", [False, True])
def test_render_matches_naive_loop_and_shapes(add_context_box):
    torch.manual_seed(0)
    objects = _objects(add_context_box)
    masks = _masks(objects)
    vectors = [torch.randn(2, objects.num_slots, C) for _ in SHAPES]
    mapper = KnowledgeMapper(C, add_context_box=add_context_box)
    out = mapper(vectors, masks, objects)
    assert [o.shape for o in out] == [(2, C, h, w) for h, w in SHAPES]
    for v, m, o in zip(vectors, masks, out):
        # Real boxes, and without the context box image 1's pseudo box too.
        x = mapper.instance_conv(_naive_paint(mapper, v, m, objects.valid | (objects.is_pseudo & ~add_context_box)))
        if add_context_box:
            x = x + mapper.context_proj(v[:, -1])[:, :, None, None]
        assert torch.allclose(o, mapper.refine(torch.relu(x)), atol=1e-5)
    assert hasattr(mapper, "context_proj") == add_context_box


def test_padding_slots_never_paint():
    objects = _objects(add_context_box=True)
    masks = _masks(objects)
    mapper = KnowledgeMapper(C, add_context_box=True).eval()
    vectors = [torch.randn(2, 3, C) for _ in SHAPES]
    garbage = [v.clone() for v in vectors]
    for g in garbage:
        g[1, :2] = 1e3  # image 1 has only padding in slots 0-1
    assert all(torch.allclose(a, b) for a, b in zip(mapper(vectors, masks, objects), mapper(garbage, masks, objects)))


@pytest.mark.parametrize("empty_image", ["reference", "context"])
@pytest.mark.parametrize("add_context_box", [False, True])
def test_full_teacher_chain_on_batch_without_boxes(add_context_box, empty_image):
    objects = _objects(add_context_box, with_boxes=False, empty_image=empty_image)
    features = [torch.randn(2, C, h, w, requires_grad=True) for h, w in SHAPES]
    modules = [LabelEncoder(K, C), AppearanceEmbedding(C), RelationAdapter(C),
               KnowledgeMapper(C, add_context_box=add_context_box)]
    encoder, appearance, relation, mapper = modules
    masks = _masks(objects)
    label = encoder(objects, (64, 64))
    vectors = relation(label, appearance(features, masks), objects.include)
    teacher = mapper(vectors, masks, objects)
    assert [t.shape for t in teacher] == [f.shape for f in features]
    assert all(t.isfinite().all() for t in teacher)
    sum(t.square().mean() for t in teacher).backward()
    grads = [p.grad for m in modules for p in m.parameters()]
    assert all(g is not None and g.isfinite().all() for g in grads)
    # With no object at all nothing reaches the student through the teacher (a pseudo box is
    # alone in its image: its attention output is its label value, whatever its appearance).
    if not add_context_box:
        assert all(f.grad is None or f.grad.eq(0).all() for f in features)
