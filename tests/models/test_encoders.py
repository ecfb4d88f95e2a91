import pytest
import torch

from gigapatch.core.errors import ConfigError
from gigapatch.models.encoders import create_encoder, encoder_names
from gigapatch.models.heads import HEADS, create_head


@pytest.mark.parametrize("name", encoder_names() + ["timm:test_resnet"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_encoder_shape_backward_finite(name, in_chans):
    torch.manual_seed(0)
    enc = create_encoder(name, out_dim=7, in_chans=in_chans)
    x = torch.randn(2, in_chans, 64, 64, requires_grad=True)
    out = enc(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_required_encoders_are_registered():
    required = {"tiny_cnn", "resnet18", "resnet34", "resnet50", "mobilenet_v2",
                "mobilenet_v3_small", "mobilenet_v3_large", "resnet18_layer2"}
    assert required <= set(encoder_names())


def test_unknown_encoder_suggests_a_name():
    with pytest.raises(ConfigError, match="resnet18"):
        create_encoder("resnet81", out_dim=4)
    with pytest.raises(ConfigError, match="unknown timm model"):
        create_encoder("timm:not_a_real_model_xyz", out_dim=4)


@pytest.mark.parametrize("name", HEADS.names())
@pytest.mark.parametrize("grid", [(1, 1), (3, 5), (16, 16)])
def test_heads_accept_any_grid(name, grid):
    head = create_head(name, in_chans=6, num_classes=4, width=8)
    z = torch.randn(2, 6, *grid, requires_grad=True)
    out = head(z)
    assert out.shape == (2, 4)
    out.sum().backward()
    assert torch.isfinite(z.grad).all()
