import torch

from lgd_cli.modeling.lgd import box_cell_masks, instance_cell_masks


def test_box_masks_match_hand_computed_cells():
    # Stride 4: box x 4..12, y 0..8 -> level units x 1..3 (centre 2, half 1), y 0..2.
    # Cell (i, j) stands for the point (j, i) in level units; borders count as inside.
    boxes = torch.tensor([[[4.0, 0.0, 12.0, 8.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]])
    include = torch.tensor([[True, True, False]])
    is_context = torch.tensor([[False, True, False]])
    (mask,) = box_cell_masks(boxes, include, is_context, [(4, 5)], [4])

    expected = torch.zeros(4, 5)
    expected[0:3, 1:4] = 1
    assert mask.shape == (1, 3, 4, 5) and mask.dtype == torch.float32
    assert torch.equal(mask[0, 0], expected)
    assert mask[0, 1].eq(1).all()  # context covers every cell whatever its box
    assert mask[0, 2].eq(0).all()  # excluded slot


def test_box_masks_per_level_and_subcell_boxes():
    boxes = torch.tensor([[[8.0, 8.0, 24.0, 16.0], [9.0, 9.0, 10.0, 10.0]]])
    include = torch.ones(1, 2, dtype=torch.bool)
    fine, coarse = box_cell_masks(boxes, include, torch.zeros(1, 2, dtype=torch.bool), [(4, 4), (2, 2)], [8, 16])
    # Stride 8: x 1..3, y 1..2. Stride 16: x 0.5..1.5, y 0.5..1 -> only cell (1, 1).
    assert fine[0, 0].nonzero().tolist() == [[1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3]]
    assert coarse[0, 0].nonzero().tolist() == [[1, 1]]
    # A box between cell points covers nothing (pooling then divides by max(count, 1)).
    assert fine[0, 1].sum() == 0


def test_box_masks_with_no_slots():
    masks = box_cell_masks(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool),
                           torch.zeros(2, 0, dtype=torch.bool), [(3, 3), (2, 2)], [8, 16])
    assert [m.shape for m in masks] == [(2, 0, 3, 3), (2, 0, 2, 2)]


def test_instance_cell_masks_resize_nearest():
    bitmask = torch.zeros(1, 2, 8, 8)
    bitmask[0, 0, :4, :4] = 1
    include = torch.tensor([[True, True]])
    is_context = torch.tensor([[False, True]])
    (mask,) = instance_cell_masks(bitmask, include, is_context, [(2, 2)])
    assert mask[0, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert mask[0, 1].eq(1).all()
