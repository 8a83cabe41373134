import pytest
import torch

from lgd_cli.modeling.lgd import box_cell_masks, level_scales


def _stride(shapes, strides):
    return level_scales(shapes, strides, (0, 0), "stride")


def test_box_masks_match_hand_computed_cells():
    # Stride 4: box x 4..12, y 0..8 -> level units x 1..3 (centre 2, half 1), y 0..2.
    # Cell (i, j) stands for the point (j, i) in level units; borders count as inside.
    boxes = torch.tensor([[[4.0, 0.0, 12.0, 8.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]])
    include = torch.tensor([[True, True, False]])
    covers_all = torch.tensor([[False, True, False]])
    (mask,) = box_cell_masks(boxes, include, covers_all, [(4, 5)], _stride([(4, 5)], [4]))

    expected = torch.zeros(4, 5)
    expected[0:3, 1:4] = 1
    assert mask.shape == (1, 3, 4, 5) and mask.dtype == torch.float32
    assert torch.equal(mask[0, 0], expected)
    assert mask[0, 1].eq(1).all()  # context covers every cell whatever its box
    assert mask[0, 2].eq(0).all()  # excluded slot


def test_box_masks_per_level_and_subcell_boxes():
    boxes = torch.tensor([[[8.0, 8.0, 24.0, 16.0], [9.0, 9.0, 10.0, 10.0]]])
    include = torch.ones(1, 2, dtype=torch.bool)
    shapes = [(4, 4), (2, 2)]
    fine, coarse = box_cell_masks(boxes, include, torch.zeros(1, 2, dtype=torch.bool), shapes, _stride(shapes, [8, 16]))
    # Stride 8: x 1..3, y 1..2. Stride 16: x 0.5..1.5, y 0.5..1 -> only cell (1, 1).
    assert fine[0, 0].nonzero().tolist() == [[1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3]]
    assert coarse[0, 0].nonzero().tolist() == [[1, 1]]
    # A box between cell points covers nothing (pooling then divides by max(count, 1)).
    assert fine[0, 1].sum() == 0


def test_box_masks_with_no_slots():
    shapes = [(3, 3), (2, 2)]
    masks = box_cell_masks(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool),
                           torch.zeros(2, 0, dtype=torch.bool), shapes, _stride(shapes, [8, 16]))
    assert [m.shape for m in masks] == [(2, 0, 3, 3), (2, 0, 2, 2)]


def test_reference_maps_boxes_by_feature_over_padded_size():
    # Padded 320 x 448, a multiple of 32 but not of 128: p5 is 10 x 14 (= 320/32 x 448/32),
    # p7 is 3 x 4 (ceil of 2.5 x 3.5), so p7's factors are 3/320 and 4/448 = 1/112, not 1/128.
    shapes, strides, padded = [(10, 14), (3, 4)], [32, 128], (320, 448)
    assert level_scales(shapes, strides, padded) == [(1 / 32, 1 / 32), (3 / 320, 1 / 112)]
    assert level_scales(shapes, strides, padded, "stride") == [(1 / 32, 1 / 32), (1 / 128, 1 / 128)]

    # Box 150..250 on both axes, centre 200, half 50. Reference on p7: y centre 200·3/320 =
    # 1.875 ± 0.469 -> row 2; x centre 200/112 = 1.786 ± 0.446 -> column 2. Stride 128: centre
    # 1.5625 ± 0.39 on both axes reaches neither index 1 nor 2: no cell at all.
    # The pseudo box [0, 0, 1, 1] covers cell (0, 0) exactly on its border under both rules.
    boxes = torch.tensor([[[150.0, 150.0, 250.0, 250.0], [0.0, 0.0, 1.0, 1.0]]])
    include, none = torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2, dtype=torch.bool)
    _, p7 = box_cell_masks(boxes, include, none, shapes, level_scales(shapes, strides, padded))
    assert p7[0, 0].nonzero().tolist() == [[2, 2]]
    assert p7[0, 1].nonzero().tolist() == [[0, 0]]
    _, p7_stride = box_cell_masks(boxes, include, none, shapes, level_scales(shapes, strides, padded, "stride"))
    assert p7_stride[0, 0].sum() == 0
    assert p7_stride[0, 1].nonzero().tolist() == [[0, 0]]
    with pytest.raises(ValueError, match="mapping"):
        level_scales(shapes, strides, padded, "nearest")

