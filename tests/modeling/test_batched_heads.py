"""The student's and the teacher's dense-head passes run as one batched head call: the same losses,
gradients and loss-normaliser state as two calls (GroupNorm and no-norm heads treat each image alone)."""
import copy

import pytest
import torch
from detectron2.utils.events import EventStorage

from lgd_cli.modeling.students.base import StudentSeams
from tests.helpers import make_batch

HEADS = {"retinanet": [], "retinanet-gn": ["MODEL.RETINANET.NORM=GN", "MODEL.FPN.OUT_CHANNELS=64"],
         "fcos": None}


def _pair(model, batch, batched: bool):
    seams = model.seams
    gt = [x["instances"] for x in batch]
    with EventStorage(0) as storage:
        images, features = seams.extract(batch)
        targets = seams.new_targets()
        maps, _ = model._teacher_maps(images, features, gt)
        pair = seams.student_and_teacher_losses if batched else super(type(seams), seams).student_and_teacher_losses
        student, teacher = pair(images, features, maps, gt, targets)
        logged = {k: v.latest() for k, v in storage.histories().items()}
    sum(student.values()).backward(retain_graph=True)
    sum(teacher.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return student, teacher, getattr(model.student, "loss_normalizer", None), logged, grads


@pytest.mark.parametrize("head", sorted(HEADS))
def test_one_batched_head_call_equals_two(build, head):  # noqa: F811
    model = build("fcos") if head == "fcos" else build("fcos", "MODEL.META_ARCHITECTURE=RetinaNet", *HEADS[head])
    assert type(model.seams).student_and_teacher_losses is not StudentSeams.student_and_teacher_losses
    batch = make_batch(seed=2)
    twin = copy.deepcopy(model)
    a = _pair(model, batch, batched=True)
    b = _pair(twin, batch, batched=False)
    for one, two in zip(a[:2], b[:2]):
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-6, msg=key)
    assert a[2] == pytest.approx(b[2])  # the loss-normaliser EMA: one update per batch either way
    assert a[3].keys() == b[3].keys()  # the same statistics logged, the teacher's under teacher/
    assert a[4].keys() == b[4].keys()
    for name in a[4]:
        torch.testing.assert_close(a[4][name], b[4][name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_batchnorm_head_keeps_two_calls(build):  # noqa: F811
    model = build("fcos", "MODEL.META_ARCHITECTURE=RetinaNet", "MODEL.RETINANET.NORM=BN")
    calls = []
    model.student.head.register_forward_hook(lambda module, args, out: calls.append(args[0][0].shape[0]))
    _pair(model, make_batch(), batched=True)
    assert calls == [2, 2]
