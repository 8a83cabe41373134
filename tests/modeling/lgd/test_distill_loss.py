import pytest
import torch
import torch.nn.functional as F

from lgd_cli.modeling.lgd import DistillationLoss, instance_norm

C = 16
SHAPES = [(8, 8), (4, 4), (1, 1)]


def _maps(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, C, h, w, generator=g, requires_grad=True) for h, w in SHAPES]


def test_matches_reference_formula():
    loss_fn = DistillationLoss(C, loss_weight=2.0)
    student, teacher = _maps(0)[:2], _maps(1)[:2]
    norm = torch.nn.InstanceNorm2d(C, affine=False)
    s = torch.cat([norm(loss_fn.adapter(x)).flatten(1) for x in student], dim=1)
    t = torch.cat([norm(x).flatten(1) for x in teacher], dim=1)
    expected = 2.0 * F.mse_loss(s, t)
    assert torch.allclose(loss_fn(student, teacher, detach_student=False), expected, atol=1e-6)


def test_one_by_one_level_is_finite():
    loss = DistillationLoss(C)(_maps(0), _maps(1), detach_student=False)
    assert loss.ndim == 0 and loss.isfinite()
    assert instance_norm(torch.randn(2, C, 1, 1)).eq(0).all()


@pytest.mark.parametrize("detach_student", [False, True])
def test_gradients_reach_adapter_and_student_only_when_allowed(detach_student):
    loss_fn = DistillationLoss(C)
    student, teacher = _maps(0), _maps(1)
    loss_fn(student, teacher, detach_student=detach_student).backward()
    assert all(t.grad is None for t in teacher)  # the teacher is never trained by this loss
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss_fn.parameters())
    if detach_student:
        assert all(s.grad is None for s in student)
    else:
        assert all(s.grad is not None for s in student) and student[0].grad.abs().sum() > 0
