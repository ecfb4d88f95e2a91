"""Explanations: IPS's selected patches and PatchGD's occlusion saliency, drawn to PNG."""

import torch

from gigapatch.config import Config
from gigapatch.core.grid import PatchGrid
from gigapatch.explain import draw_patch_weights, draw_saliency, occlusion_saliency
from gigapatch.methods.base import create_method

PNG = b"\x89PNG\r\n\x1a\n"


def _patchgd(**model) -> torch.nn.Module:
    cfg = Config()
    cfg.data.num_classes = 4
    cfg.model.latent_dim = 8
    cfg.model.head_width = 8
    for key, value in model.items():
        setattr(cfg.model, key, value)
    cfg.method.patch_size = 16
    cfg.method.fill_chunk = 7
    torch.manual_seed(0)
    return create_method(cfg).eval()


def test_occlusion_saliency_is_zero_when_every_cell_is_the_mean():
    method = _patchgd()
    flat = torch.full((1, 1, 64, 48), 90, dtype=torch.uint8)  # every patch the same
    s = occlusion_saliency(method, flat, chunk=5)
    assert s.shape == (4, 3)
    assert torch.allclose(s, torch.zeros(4, 3), atol=1e-6)


def test_occlusion_saliency_finds_the_one_cell_that_decides():
    method = _patchgd(head="linear", head_pool="max")
    image = torch.zeros(1, 1, 64, 64, dtype=torch.uint8)
    image[0, 0, 36:44, 20:28] = 255  # content in cell (2, 1) only
    s = occlusion_saliency(method, image)
    assert s.shape == (4, 4)
    others = torch.cat([s.flatten()[:9], s.flatten()[10:]])
    # Empty cells equal each other: occluding one of them changes little compared with the
    # one cell that differs (max pooling over Z).
    assert s[2, 1].abs() > others.abs().max()


def test_drawings_are_pngs(tmp_path):
    image = torch.randint(0, 256, (3, 100, 140), dtype=torch.uint8)
    grid = PatchGrid(100, 140, 20)
    a = draw_patch_weights(image, grid, torch.tensor([0, 5, 34]), torch.tensor([0.2, 0.5, 0.3]),
                           tmp_path / "w.png", "weights")
    b = draw_saliency(image[:1], grid, torch.rand(grid.rows, grid.cols), tmp_path / "s.png")
    assert a.read_bytes()[:8] == PNG and b.read_bytes()[:8] == PNG


def test_first_order_saliency_approximates_occlusion_on_big_grids():
    method = _patchgd(head="linear", head_pool="max")
    torch.manual_seed(1)
    image = torch.randint(0, 256, (1, 1, 64, 64), dtype=torch.uint8)
    exact = occlusion_saliency(method, image)
    approx = occlusion_saliency(method, image, exact_up_to=0)
    assert approx.shape == exact.shape == (4, 4)
    # The first-order approximation finds the same most important cell.
    assert int(approx.flatten().argmax()) == int(exact.flatten().argmax())
