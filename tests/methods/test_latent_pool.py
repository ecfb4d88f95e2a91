"""The summary P of dense PatchGD's map from running sums equals P of the whole map."""

import pytest
import torch

from gigapatch.core.grid import PatchGrid
from gigapatch.methods.latent_map import MapGeometry
from gigapatch.methods.latent_pool import MapPool


def _reference(pool: MapPool, z: torch.Tensor) -> torch.Tensor:
    if pool.kind == "mean":
        return z.mean(dim=(2, 3))
    if pool.kind == "share":
        logs = torch.softmax(z, dim=1).mean(dim=(2, 3)).log()
        return torch.cat([logs[:, :1], logs[:, 1:] - logs[:, 1:].max(dim=1, keepdim=True).values],
                         dim=1)
    w = torch.sigmoid(pool.gate(z))
    return (w * z).sum(dim=(2, 3)) / w.sum(dim=(2, 3))


@pytest.mark.parametrize("kind", ["mean", "gated", "share"])
def test_swapping_blocks_gives_the_summary_of_the_updated_map(kind):
    torch.manual_seed(0)
    geo = MapGeometry(PatchGrid(48, 64, 16), s=4, halo=1)  # 3×4 cells of 4×4 map pixels
    pool = MapPool(5, kind).double()
    if kind == "gated":
        torch.nn.init.normal_(pool.gate.weight)
    z = torch.randn(2, 5, *geo.size, dtype=torch.float64)
    total = pool.map_sums(z)
    torch.testing.assert_close(pool.whole(z, torch.device("cpu")), _reference(pool, z).float())
    image, cells = [0, 0, 1, 1], [1, 6, 0, 11]  # k = 2 per image
    new = torch.randn(4, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    old = pool.block_sums(z, geo, image, cells)
    got = pool.summary((total[0] - old[0], total[1] - old[1]), new, b=2, k=2)
    pasted = z.clone()
    for bi, cell, block in zip(image, cells, new.detach()):
        y, x = geo.origin(cell)
        pasted[bi, :, y : y + 4, x : x + 4] = block
    torch.testing.assert_close(got, _reference(pool, pasted))
    (got * torch.randn_like(got)).sum().backward()  # differentiable in the re-encoded blocks
    assert new.grad is not None and new.grad.abs().sum() > 0


def test_the_gate_starts_at_the_plain_mean():
    z = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    gated = MapPool(3, "gated").double()
    torch.testing.assert_close(gated.whole(z, torch.device("cpu")),
                               z.mean(dim=(2, 3)).float())


def test_a_learnt_gate_weighs_the_sparse_pixels():
    """One object pixel among 4,095 of background: the plain mean barely sees it, a gate
    open on it and shut elsewhere gives (almost) its features."""
    z = torch.zeros(1, 2, 64, 64, dtype=torch.float64)
    z[0, 0] = -1.0  # background: channel 0 low
    z[0, :, 10, 20] = torch.tensor([1.0, 5.0])  # the object
    gated = MapPool(2, "gated").double()
    with torch.no_grad():
        gated.gate.weight[:] = torch.tensor([20.0, 0.0]).view(1, 2, 1, 1)
    assert MapPool(2).whole(z, torch.device("cpu"))[0, 1] < 0.01
    assert gated.whole(z, torch.device("cpu"))[0, 1] > 4.9


def test_class_shares_count_the_objects_of_each_class():
    """Class scores: 3 objects of class 1 and one of class 2 on background (class 0). The
    share summary gives class 1 (the most common) 0 and class 2 about −log 3, whatever the
    background's size (a confident background leaks little into the classes' shares); the
    plain mean of the scores barely tells them apart. Each pixel's agreement channel is its
    class's entry: ≈ 0 on class 1's objects, ≈ −log 3 on class 2's."""
    def canvas(side):
        z = torch.zeros(1, 3, side, side, dtype=torch.float64)
        z[0, 0] = 12.0  # background is confidently class 0
        for y, c in [(2, 1), (6, 1), (10, 1), (14, 2)]:
            z[0, :, y : y + 2, 3:5] = 0.0
            z[0, c, y : y + 2, 3:5] = 12.0
        return z
    share = MapPool(3, "share").double()
    log3 = torch.log(torch.tensor(3.0)).item()
    for side in (16, 64):
        z = canvas(side)
        p = share.whole(z, torch.device("cpu"))[0]
        assert p[1].item() == 0.0 and abs(p[2].item() + log3) < 0.01
        agree = share.pixel_features(z, p[None].double())[0, 0]
        assert abs(agree[2, 3].item()) < 0.01 and abs(agree[14, 3].item() + log3) < 0.01
    mean = MapPool(3).whole(canvas(64), torch.device("cpu"))[0]
    assert (mean[1] - mean[2]).item() < 0.1


def test_only_share_adds_pixel_features():
    z = torch.randn(2, 4, 6, 6)
    for kind in ("mean", "gated"):
        pool = MapPool(4, kind)
        assert pool.pixel_channels == 0 and pool.pixel_features(z, torch.zeros(2, 4)) is None
    assert MapPool(4, "share").pixel_channels == 1
