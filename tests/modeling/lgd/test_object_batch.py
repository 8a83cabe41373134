import pytest
import torch

from lgd_cli.modeling.lgd import pack_objects

NO_CLASS = torch.zeros(0, dtype=torch.long)


def test_reference_clamps_every_box_and_the_context_to_the_last_canvas_pixel():
    # Canvas 200 x 300 (H x W). Image 0 fills it and has a box on its right/bottom edge; image 1
    # (180 x 250) has a box past its own extent but inside the canvas.
    boxes = [torch.tensor([[250.0, 150.0, 300.0, 200.0], [-5.0, 2.0, 50.0, 70.0]]),
             torch.tensor([[200.0, 100.0, 260.0, 190.0]])]
    classes = [torch.tensor([2, 0]), torch.tensor([1])]
    objects = pack_objects(boxes, classes, [(200, 300), (180, 250)], (200, 300), add_context_box=True)

    assert objects.boxes.tolist() == [
        [[250.0, 150.0, 299.0, 199.0], [0.0, 2.0, 50.0, 70.0], [0.0, 0.0, 299.0, 199.0]],
        [[200.0, 100.0, 260.0, 190.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 299.0, 199.0]],
    ]
    assert objects.classes.tolist() == [[2, 0, -1], [1, -1, -1]]
    assert objects.valid.tolist() == [[True, True, False], [True, False, False]]
    assert objects.is_context.tolist() == [[False, False, True]] * 2
    assert not objects.is_pseudo.any()

    # lgd's rule: each image's own extent; the context box is the whole canvas.
    lgd = pack_objects(boxes, classes, [(200, 300), (180, 250)], (200, 300), add_context_box=True,
                       box_clamp="image")
    assert lgd.boxes[0, 0].tolist() == [250.0, 150.0, 300.0, 200.0]
    assert lgd.boxes[1, 0].tolist() == [200.0, 100.0, 250.0, 180.0]
    assert lgd.boxes[:, 2].tolist() == [[0.0, 0.0, 300.0, 200.0]] * 2


def test_lgd_rules_pad_clamp_to_the_image_and_append_context():
    boxes = [torch.tensor([[-5.0, 2.0, 50.0, 70.0], [1.0, 1.0, 3.0, 3.0]]), torch.zeros(0, 4)]
    classes = [torch.tensor([2, 0]), NO_CLASS]
    objects = pack_objects(boxes, classes, [(60, 40), (64, 64)], (64, 64), add_context_box=True,
                           box_clamp="image", empty_image="context")

    assert objects.boxes.shape == (2, 3, 4) and objects.num_slots == 3
    # Clamped to image 0's own 40×60 extent, not to the padded 64×64 canvas.
    assert objects.boxes[0, 0].tolist() == [0.0, 2.0, 40.0, 60.0]
    assert objects.boxes[:, 2].tolist() == [[0.0, 0.0, 64.0, 64.0]] * 2
    assert objects.classes.tolist() == [[2, 0, -1], [-1, -1, -1]]
    assert objects.valid.tolist() == [[True, True, False], [False, False, False]]
    assert objects.is_context.tolist() == [[False, False, True], [False, False, True]]
    assert objects.include.tolist() == [[True, True, True], [False, False, True]]
    assert objects.covers_all.tolist() == objects.is_context.tolist()
    assert objects.masks is None and not objects.is_pseudo.any()


def test_reference_gives_an_empty_image_a_pseudo_box_in_place_of_its_context():
    boxes = [torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.zeros(0, 4)]
    classes = [torch.tensor([0]), NO_CLASS]
    with_context = pack_objects(boxes, classes, [(32, 48)] * 2, (32, 48), add_context_box=True)
    # Image 1: no context box; its one slot is the pseudo box [0, 0, 1, 1], without a class,
    # rendered as the image's context (its last slot) but with the cells of its own box.
    assert with_context.boxes[1].tolist() == [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]
    assert with_context.boxes[0, 1].tolist() == [0.0, 0.0, 47.0, 31.0]
    assert with_context.classes[1].tolist() == [-1, -1]
    assert with_context.is_pseudo.tolist() == [[False, False], [False, True]]
    assert with_context.is_context.tolist() == [[False, True], [False, True]]
    assert with_context.covers_all.tolist() == [[False, True], [False, False]]
    assert with_context.painted.tolist() == [[True, False], [False, False]]
    assert not with_context.valid[1].any()

    # Without the context box the pseudo box is an ordinary painted slot.
    bare = pack_objects(boxes, classes, [(32, 48)] * 2, (32, 48), add_context_box=False)
    assert bare.boxes[1].tolist() == [[0.0, 0.0, 1.0, 1.0]]
    assert bare.is_pseudo.tolist() == [[False], [True]] and not bare.is_context.any()
    assert bare.painted.tolist() == [[True], [True]] and bare.valid.tolist() == [[True], [False]]


@pytest.mark.parametrize("add_context_box", [False, True])
def test_reference_batch_without_any_box_has_one_pseudo_slot_per_image(add_context_box):
    empty, no_cls = [torch.zeros(0, 4)] * 2, [NO_CLASS] * 2
    objects = pack_objects(empty, no_cls, [(32, 32)] * 2, (32, 48), add_context_box)
    assert objects.boxes.tolist() == [[[0.0, 0.0, 1.0, 1.0]]] * 2
    assert objects.is_pseudo.all() and not objects.valid.any() and not objects.covers_all.any()
    assert objects.is_context.tolist() == [[add_context_box]] * 2


def test_lgd_rule_batch_without_any_box():
    empty, no_cls = [torch.zeros(0, 4)] * 2, [NO_CLASS] * 2
    bare = pack_objects(empty, no_cls, [(32, 32)] * 2, (32, 32), add_context_box=False, empty_image="context")
    assert bare.boxes.shape == (2, 0, 4) and bare.valid.shape == (2, 0) and bare.num_slots == 0

    with_context = pack_objects(empty, no_cls, [(32, 32)] * 2, (32, 48), add_context_box=True,
                                box_clamp="image", empty_image="context")
    assert with_context.boxes.tolist() == [[[0.0, 0.0, 48.0, 32.0]]] * 2
    assert with_context.is_context.all() and not with_context.valid.any()


@pytest.mark.parametrize("empty_image", ["reference", "context"])
def test_pack_mask_crops_pad_with_zeros_and_context_with_ones(empty_image):
    masks = [torch.rand(1, 7, 7), torch.zeros(0, 7, 7)]
    objects = pack_objects(
        [torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.zeros(0, 4)],
        [torch.tensor([1]), NO_CLASS],
        [(8, 8), (8, 8)], (8, 8), add_context_box=True, gt_masks7=masks, empty_image=empty_image,
    )
    assert objects.masks.shape == (2, 2, 7, 7)
    assert torch.equal(objects.masks[0, 0], masks[0][0])
    assert objects.masks[1, 0].eq(0).all() and objects.masks[0, 1].eq(1).all()
    # The reference describes a pseudo box with an empty crop, the scene with a full one.
    assert objects.masks[1, 1].eq(0 if empty_image == "reference" else 1).all()


def test_unknown_rules_are_refused():
    args = [torch.zeros(0, 4)], [NO_CLASS], [(8, 8)], (8, 8), True
    with pytest.raises(ValueError, match="box_clamp"):
        pack_objects(*args, box_clamp="canvas")
    with pytest.raises(ValueError, match="empty_image"):
        pack_objects(*args, empty_image="pseudo")
