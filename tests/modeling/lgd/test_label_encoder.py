import pytest
import torch

from lgd_cli.modeling.lgd import LabelEncoder, pack_objects

K, C = 3, 16


def _objects(boxes, classes, add_context_box=True, size=(32, 48), masks=None, **rules):
    sizes = [size] * len(boxes)
    return pack_objects([torch.tensor(b).reshape(-1, 4) for b in boxes],
                        [torch.tensor(c, dtype=torch.long) for c in classes],
                        sizes, size, add_context_box, masks, **rules)


def test_descriptors_one_hot_and_context_reference():
    # Canvas 32 x 48. The reference clamps to the last pixel: the box's bottom edge y2 = 32
    # becomes 31, the context box [0, 0, 48, 32] becomes [0, 0, 47, 31] (descriptor 47/48, 31/32).
    # Image 1 has no box: one pseudo box [0, 0, 1, 1], no class, no context box.
    objects = _objects([[[0.0, 8.0, 24.0, 32.0]], []], [[2], []])
    desc = LabelEncoder(K, C).descriptors(objects, (32, 48))
    assert desc.shape == (2, 2, 4 + K)
    # [x1/W, y1/H, x2/W, y2/H] + one-hot, mapped from [0, 1] to [-1, 1].
    torch.testing.assert_close(desc[0, 0], torch.tensor([-1.0, -0.5, 0.0, 2 * 31 / 32 - 1, -1.0, -1.0, 1.0]))
    torch.testing.assert_close(desc[0, 1], torch.tensor([-1.0, -1.0, 2 * 47 / 48 - 1, 2 * 31 / 32 - 1, -1.0, -1.0, -1.0]))
    torch.testing.assert_close(desc[1, 1], torch.tensor([-1.0, -1.0, 2 / 48 - 1, 2 / 32 - 1, -1.0, -1.0, -1.0]))
    assert desc[1, 0].eq(-1).all()  # padding


def test_descriptors_one_hot_and_context_lgd_rules():
    objects = _objects([[[0.0, 8.0, 24.0, 32.0]], []], [[2], []], box_clamp="image", empty_image="context")
    desc = LabelEncoder(K, C).descriptors(objects, (32, 48))
    assert torch.allclose(desc[0, 0], torch.tensor([-1.0, -0.5, 0.0, 1.0, -1.0, -1.0, 1.0]))
    assert torch.allclose(desc[:, 1], torch.tensor([-1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0]))
    assert desc[1, 0].eq(-1).all()  # padding


def test_descriptors_norm_classes_and_mask_crops():
    crop = torch.full((1, 7, 7), 0.5)
    objects = _objects([[[0.0, 0.0, 48.0, 32.0]]], [[2]], masks=[crop])
    enc = LabelEncoder(K, C, category_format="norm_classes", use_mask_crops=True)
    desc = enc.descriptors(objects, (32, 48))
    assert desc.shape == (1, 2, 4 + 1 + 49)
    assert torch.isclose(desc[0, 0, 4], torch.tensor(2 / K * 2 - 1))
    assert desc[0, 0, 5:].eq(0).all() and desc[0, 1, 5:].eq(1).all()
    assert enc(objects, (32, 48)).shape == (1, 2, C)
    with pytest.raises(ValueError, match="gt_masks7"):
        enc.descriptors(_objects([[[0.0, 0.0, 4.0, 4.0]]], [[0]]), (32, 48))
    with pytest.raises(ValueError, match="category_format"):
        LabelEncoder(K, C, category_format="bits")


def test_forward_shapes_padding_zero_and_gradients():
    objects = _objects([[[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 30.0]], []], [[0, 1], []])
    enc = LabelEncoder(K, C)
    out = enc(objects, (32, 48))
    assert out.shape == (2, 3, C)
    assert out[1, :2].eq(0).all()  # padding of the empty image
    assert out[1, 2].abs().sum() > 0  # its context slot still gets an embedding
    out.sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in enc.parameters())


@pytest.mark.parametrize("empty_image", ["reference", "context"])
@pytest.mark.parametrize("add_context_box", [False, True])
def test_batch_without_boxes(add_context_box, empty_image):
    objects = _objects([[], []], [[], []], add_context_box, empty_image=empty_image)
    enc = LabelEncoder(K, C)
    out = enc(objects, (32, 48))
    # One pseudo box per image (reference), else the context slot if any.
    slots = 1 if empty_image == "reference" else int(add_context_box)
    assert out.shape == (2, slots, C) and out.isfinite().all()
    (out.sum() + 0.0).backward()
    # N == 0 still runs the whole graph: zero (not missing) gradients, as DDP expects.
    assert all(p.grad is not None and p.grad.isfinite().all() for p in enc.parameters())


def test_global_pool_stays_within_each_image():
    enc = LabelEncoder(K, C).eval()
    a = _objects([[[0.0, 0.0, 10.0, 10.0]], [[1.0, 2.0, 3.0, 4.0]]], [[0], [1]])
    b = _objects([[[0.0, 0.0, 10.0, 10.0]], [[20.0, 2.0, 40.0, 30.0], [0.0, 0.0, 5.0, 5.0]]], [[0], [2, 2]])
    alone = _objects([[[0.0, 0.0, 10.0, 10.0]]], [[0]])
    out_a, out_b, out_alone = enc(a, (32, 48)), enc(b, (32, 48)), enc(alone, (32, 48))
    # Image 0 is unchanged whatever image 1 holds, and however many padding slots it gets.
    assert torch.allclose(out_a[0], out_b[0, [0, 2]], atol=1e-6)
    assert torch.allclose(out_a[0], out_alone[0], atol=1e-6)
    # ... while within an image the objects do see each other through the pool.
    changed = _objects([[[0.0, 0.0, 10.0, 10.0]], [[20.0, 2.0, 40.0, 30.0], [9.0, 9.0, 30.0, 30.0]]], [[0], [2, 1]])
    assert not torch.allclose(enc(changed, (32, 48))[1, 0], out_b[1, 0])


def test_any_width_and_class_count():
    objects = _objects([[[0.0, 0.0, 4.0, 4.0]]], [[6]], add_context_box=False)
    assert LabelEncoder(7, 40)(objects, (32, 48)).shape == (1, 1, 40)
