"""Dense networks: any input size in, per-pixel outputs of the same size out."""

import pytest
import torch

from gigapatch.core.errors import ConfigError
from gigapatch.models.dense import create_dense_net


@pytest.mark.parametrize("name", ["tiny_unet", "smp:unet", "smp:fpn:mobilenet_v2"])
@pytest.mark.parametrize("size", [(32, 32), (37, 50)])
def test_outputs_have_the_input_size_and_gradients(name, size):
    torch.manual_seed(0)
    net = create_dense_net(name, 3, in_chans=1)
    x = torch.randn(2, 1, *size, requires_grad=True)
    y = net(x)
    assert y.shape == (2, 3, *size)
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_padding_does_not_leak_across_the_batch():
    net = create_dense_net("tiny_unet", 2, in_chans=1).eval()
    a, b = torch.randn(1, 1, 30, 30), torch.randn(1, 1, 30, 30)
    with torch.no_grad():
        torch.testing.assert_close(net(torch.cat([a, b]))[:1], net(a))


def test_bad_names_and_settings_are_refused():
    with pytest.raises(ConfigError, match="tiny_unet"):
        create_dense_net("tiny_unt", 2)
    with pytest.raises(ConfigError, match="Wrong architecture"):
        create_dense_net("smp:nonet", 2)
    with pytest.raises(ConfigError, match="smp:<arch>"):
        create_dense_net("smp:", 2)
    with pytest.raises(ConfigError, match="no pretrained weights"):
        create_dense_net("tiny_unet", 2, pretrained=True)
