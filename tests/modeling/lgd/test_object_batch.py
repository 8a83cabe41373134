import torch

from lgd_cli.modeling.lgd import pack_objects


def test_pack_pads_clamps_and_appends_context():
    boxes = [torch.tensor([[-5.0, 2.0, 50.0, 70.0], [1.0, 1.0, 3.0, 3.0]]), torch.zeros(0, 4)]
    classes = [torch.tensor([2, 0]), torch.zeros(0, dtype=torch.long)]
    objects = pack_objects(boxes, classes, [(60, 40), (64, 64)], (64, 64), add_context_box=True)

    assert objects.boxes.shape == (2, 3, 4) and objects.num_slots == 3
    # Clamped to image 0's own 40×60 extent, not to the padded 64×64 canvas.
    assert objects.boxes[0, 0].tolist() == [0.0, 2.0, 40.0, 60.0]
    assert objects.boxes[:, 2].tolist() == [[0.0, 0.0, 64.0, 64.0]] * 2
    assert objects.classes.tolist() == [[2, 0, -1], [-1, -1, -1]]
    assert objects.valid.tolist() == [[True, True, False], [False, False, False]]
    assert objects.is_context.tolist() == [[False, False, True], [False, False, True]]
    assert objects.include.tolist() == [[True, True, True], [False, False, True]]
    assert objects.masks is None


def test_pack_without_any_box():
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    no_cls = [torch.zeros(0, dtype=torch.long)] * 2
    bare = pack_objects(empty, no_cls, [(32, 32)] * 2, (32, 32), add_context_box=False)
    assert bare.boxes.shape == (2, 0, 4) and bare.valid.shape == (2, 0) and bare.num_slots == 0

    with_context = pack_objects(empty, no_cls, [(32, 32)] * 2, (32, 48), add_context_box=True)
    assert with_context.boxes.tolist() == [[[0.0, 0.0, 48.0, 32.0]]] * 2
    assert with_context.is_context.all() and not with_context.valid.any()


def test_pack_mask_crops_pad_with_zeros_and_context_with_ones():
    masks = [torch.rand(1, 7, 7), torch.zeros(0, 7, 7)]
    objects = pack_objects(
        [torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.zeros(0, 4)],
        [torch.tensor([1]), torch.zeros(0, dtype=torch.long)],
        [(8, 8), (8, 8)], (8, 8), add_context_box=True, gt_masks7=masks,
    )
    assert objects.masks.shape == (2, 2, 7, 7)
    assert torch.equal(objects.masks[0, 0], masks[0][0])
    assert objects.masks[1, 0].eq(0).all() and objects.masks[:, 1].eq(1).all()
