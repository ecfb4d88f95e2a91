"""Dense networks for segmentation, built by name: ``(B, in_chans, h, w)`` → ``(B, C, h, w)``.

A dense network gives ``out_channels`` values per pixel at the input's resolution (its output
stride is 1; inputs whose sides are not a multiple of the network's divisor are padded with
zeros and the output cropped back). Names:

- ``tiny_unet``: a two-level U-Net (16/32/64 channels, GroupNorm) for tests and CPU demos;
- ``smp:<arch>`` or ``smp:<arch>:<encoder>``: any architecture of
  `segmentation-models-pytorch <https://smp.readthedocs.io>`_ (``unet``, ``unetplusplus``,
  ``fpn``, ``deeplabv3plus``, ``pan``, ``linknet``, ``manet``, …) with any of its encoders
  (default ``resnet18``), e.g. ``smp:deeplabv3plus:resnet34``. Needs the ``seg`` extra
  (``pip install 'gigapatch[seg]'``).

``pretrained=True`` asks segmentation-models-pytorch for the encoder's ImageNet weights
(downloaded by that library on first use, then read from its cache); gigapatch itself never
downloads.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gigapatch.core.errors import ConfigError
from gigapatch.core.registry import Registry
from gigapatch.models.weights import load_weights

__all__ = ["DENSE_NETS", "DenseNet", "create_dense_net", "dense_net_names"]

DenseBuilder = Callable[[int, int, bool], nn.Module]
DENSE_NETS: Registry[DenseBuilder] = Registry("segmentation network")

#: Default encoder of ``smp:<arch>``.
SMP_DEFAULT_ENCODER = "resnet18"


class DenseNet(nn.Module):
    """Pads the input to a multiple of ``divisor`` (zeros), applies ``net``, crops back:
    ``(B, in, h, w)`` → ``(B, out, h, w)``."""

    def __init__(self, net: nn.Module, divisor: int) -> None:
        super().__init__()
        self.net, self.divisor = net, divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        d = self.divisor
        ph, pw = -h % d, -w % d
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return self.net(x)[..., :h, :w]


def create_dense_net(name: str, out_channels: int, in_chans: int = 3,
                     pretrained: bool = False, weights: str | None = None) -> DenseNet:
    """Build the dense network ``name``: ``(B, in_chans, h, w)`` → ``(B, out_channels, h, w)``.

    Args:
        name: ``tiny_unet`` or ``smp:<arch>[:<encoder>]`` (see the module doc).
        out_channels: values per pixel (class logits, or PatchGD's latent channels C).
        in_chans: input channels (1 grayscale, 3 RGB).
        pretrained: ImageNet weights for an smp encoder (through segmentation-models-pytorch).
        weights: a local weight file instead (``model.weights``,
            :func:`~gigapatch.models.weights.load_weights`): a whole network's state dict, a
            gigapatch checkpoint's network, or an encoder's ImageNet checkpoint (e.g.
            torchvision's ResNet-18 into ``smp:unet:resnet18``: the key prefix is found).
    """
    if not (isinstance(out_channels, int) and out_channels > 0):
        raise ConfigError(f"out_channels must be a positive integer, got {out_channels!r}.")
    if pretrained and weights:
        raise ConfigError("model.pretrained and model.weights both set: choose the hub "
                          "weights (pretrained: true) or the local file (weights: PATH).")
    if isinstance(name, str) and name.startswith("smp:"):
        net = _smp(name, out_channels, in_chans, pretrained)
    else:
        net = DENSE_NETS.get(name)(out_channels, in_chans, pretrained)
    if weights:
        load_weights(net, weights, f"network {name}")
    return net


def dense_net_names() -> list[str]:
    """Registered names (plus the ``smp:<arch>[:<encoder>]`` family)."""
    return [*DENSE_NETS.names(), "smp:<arch>[:<encoder>]"]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(8, cout), cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(min(8, cout), cout),
        nn.ReLU(inplace=True),
    )


class TinyUNet(nn.Module):
    """Two down and two up levels (16, 32, 64 channels), skip connections, 1×1 output conv.
    Input sides must be multiples of 4 (:class:`DenseNet` pads)."""

    def __init__(self, out_channels: int, in_chans: int, width: int = 16) -> None:
        super().__init__()
        w = width
        self.enc1, self.enc2, self.mid = _block(in_chans, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2), _block(4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2), _block(2 * w, w)
        self.out = nn.Conv2d(w, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


@DENSE_NETS.register("tiny_unet")
def _tiny_unet(out_channels: int, in_chans: int, pretrained: bool) -> DenseNet:
    if pretrained:
        raise ConfigError("tiny_unet has no pretrained weights; set model.pretrained: false.")
    return DenseNet(TinyUNet(out_channels, in_chans), divisor=4)


def _smp(name: str, out_channels: int, in_chans: int, pretrained: bool) -> DenseNet:
    if importlib.util.find_spec("segmentation_models_pytorch") is None:
        raise ConfigError(
            f"model {name!r} needs segmentation-models-pytorch: pip install 'gigapatch[seg]' "
            "(or pip install segmentation-models-pytorch); or use tiny_unet."
        )
    import segmentation_models_pytorch as smp  # noqa: PLC0415 - optional dependency

    parts = name.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise ConfigError(f"model {name!r}: write smp:<arch> or smp:<arch>:<encoder>, e.g. "
                          "smp:unet:resnet18.")
    arch, encoder = parts[1], parts[2] if len(parts) == 3 else SMP_DEFAULT_ENCODER
    try:
        net = smp.create_model(arch, encoder_name=encoder, in_channels=in_chans,
                               classes=out_channels,
                               encoder_weights="imagenet" if pretrained else None)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"model {name!r}: segmentation-models-pytorch says: {e}") from None
    depth = getattr(net.encoder, "_depth", 5)
    return DenseNet(net, divisor=2**depth)
