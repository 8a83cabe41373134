import pytest
import torch

from lgd_cli.modeling.lgd import RelationAdapter

C, L = 16, 2


def _inputs(B=2, N=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    label = torch.randn(B, N, C, generator=g, requires_grad=True)
    appearance = [torch.randn(B, N, C, generator=g, requires_grad=True) for _ in range(L)]
    return label, appearance


@pytest.mark.parametrize("pattern", ["stuGuided", "labelGuided", "student_fill", "teacher_fill"])
def test_patterns_shapes_and_padding_zero(pattern):
    label, appearance = _inputs()
    include = torch.tensor([[True, True, False, True], [True, False, False, False]])
    out = RelationAdapter(C, num_heads=4, pattern=pattern)(label, appearance, include)
    assert len(out) == L and all(o.shape == (2, 4, C) for o in out)
    assert all(o[~include].eq(0).all() and o.isfinite().all() for o in out)


def test_fill_patterns_pass_embeddings_through():
    label, appearance = _inputs()
    include = torch.ones(2, 4, dtype=torch.bool)
    student = RelationAdapter(C, pattern="student_fill")(label, appearance, include)
    assert all(torch.equal(s, a) for s, a in zip(student, appearance))
    teacher_fill = RelationAdapter(C, pattern="teacher_fill")
    out = teacher_fill(label, appearance, include)
    assert torch.equal(out[0], teacher_fill.label_proj(label)) and torch.equal(out[0], out[1])


@pytest.mark.parametrize("pattern", ["stuGuided", "labelGuided"])
def test_attention_never_crosses_images(pattern):
    module = RelationAdapter(C, num_heads=8, pattern=pattern).eval()
    label, appearance = _inputs()
    include = torch.tensor([[True, True, True, False], [True, True, True, True]])
    before = module(label, appearance, include)
    label2, appearance2 = label.detach().clone(), [a.detach().clone() for a in appearance]
    label2[1] += 5.0
    for a in appearance2:
        a[1] = torch.randn(4, C)
    after = module(label2, appearance2, include)
    assert all(torch.allclose(b[0], a[0], atol=1e-6) for b, a in zip(before, after))
    assert not torch.allclose(before[0][1], after[0][1])
    # Padding of image 0 is invisible too: its values do not matter.
    label3 = label.detach().clone()
    label3[0, 3] = 100.0
    assert torch.allclose(module(label3, appearance, include)[0][0], before[0][0], atol=1e-6)


def test_image_without_objects_and_batch_without_slots():
    module = RelationAdapter(C)
    label, appearance = _inputs()
    include = torch.tensor([[True, True, False, False], [False, False, False, False]])
    out = module(label, appearance, include)
    assert all(o.isfinite().all() and o[1].eq(0).all() for o in out)
    sum(o.sum() for o in out).backward()
    assert label.grad.isfinite().all() and label.grad[1].eq(0).all()

    empty_label, empty_app = _inputs(N=0)
    out = module(empty_label, empty_app, torch.zeros(2, 0, dtype=torch.bool))
    assert [o.shape for o in out] == [(2, 0, C)] * L
    sum(o.sum() for o in out).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in module.parameters())


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        RelationAdapter(12, num_heads=8)
    with pytest.raises(ValueError, match="pattern"):
        RelationAdapter(C, pattern="cross")
