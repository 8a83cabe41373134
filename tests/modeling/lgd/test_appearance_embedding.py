import torch

from lgd_cli.modeling.lgd import AppearanceEmbedding, box_cell_masks

C = 16


def _naive_pool(projected, mask):
    B, N = mask.shape[:2]
    out = torch.zeros(B, N, projected.shape[1])
    for b in range(B):
        for n in range(N):
            cells = mask[b, n].bool()
            if cells.any():
                out[b, n] = projected[b][:, cells].mean(dim=1)
    return out


def test_pooling_matches_naive_loop():
    torch.manual_seed(0)
    module = AppearanceEmbedding(C)
    features = [torch.randn(2, C, 8, 8), torch.randn(2, C, 4, 4)]
    masks = [(torch.rand(2, 5, 8, 8) > 0.6).float(), (torch.rand(2, 5, 4, 4) > 0.6).float()]
    masks[0][1, 3] = 0  # an object with no cell
    pooled = module(features, masks)
    for feature, mask, got in zip(features, masks, pooled):
        assert got.shape == (2, 5, C)
        assert torch.allclose(got, _naive_pool(module.project(feature), mask), atol=1e-5)
    assert pooled[0][1, 3].eq(0).all()


def test_box_masks_feed_pooling_and_empty_batch():
    module = AppearanceEmbedding(C)
    features = [torch.randn(2, C, 4, 4, requires_grad=True)]
    masks = box_cell_masks(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool),
                           torch.zeros(2, 0, dtype=torch.bool), [(4, 4)], [(1 / 8, 1 / 8)])
    (pooled,) = module(features, masks)
    assert pooled.shape == (2, 0, C)
    pooled.sum().backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in module.parameters())


def test_detach_flag_controls_student_gradient():
    masks = [torch.ones(1, 1, 4, 4)]
    for detach, expect_grad in [(False, True), (True, False)]:
        features = [torch.randn(1, C, 4, 4, requires_grad=True)]
        module = AppearanceEmbedding(C, detach_features=detach)
        module(features, masks)[0].pow(2).sum().backward()
        assert (features[0].grad is not None) == expect_grad
        assert module.project[0].weight.grad.abs().sum() > 0  # the projection learns either way
