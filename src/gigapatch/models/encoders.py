"""Patch encoders θ1, built by name.

Every encoder maps ``(B, in_chans, h, w)`` to ``(B, out_dim)`` for any ``h, w`` large enough for
its strides (global average pooling at the end). Names:

- ``tiny_cnn``: a small CNN (3 strided convs + GroupNorm, max pool) for tests and CPU demos;
- torchvision: ``resnet18``, ``resnet34``, ``resnet50``, ``resnet18_layer2`` (ResNet-18 cut after
  ``layer2``, as in the IPS paper), ``mobilenet_v2``, ``mobilenet_v3_small``,
  ``mobilenet_v3_large``;
- ``timm:<model>`` for any timm model when timm is installed (e.g. ``timm:resnet10t``).

``pretrained=True`` asks torchvision/timm for ImageNet weights; they are fetched by those
libraries (or read from their cache). Nothing in gigapatch downloads on its own.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from torch.utils.checkpoint import checkpoint

from gigapatch.core.errors import ConfigError
from gigapatch.core.registry import Registry
from gigapatch.models.weights import is_gigapatch_checkpoint, load_weights

log = logging.getLogger("gigapatch")

EncoderBuilder = Callable[[int, int, bool], nn.Module]
ENCODERS: Registry[EncoderBuilder] = Registry("encoder")


def create_encoder(
    name: str, out_dim: int, in_chans: int = 3, pretrained: bool = False, *,
    weights: str | None = None, checkpoint_activations: bool = False,
) -> nn.Module:
    """Build the encoder ``name``: ``(B, in_chans, h, w)`` → ``(B, out_dim)``.

    Args:
        name: a registered name (see :func:`encoder_names`) or ``timm:<model>``.
        out_dim: size of the output vector (the latent channels ``C`` of PatchGD's Z).
        in_chans: input channels (1 for grayscale, 3 for RGB).
        pretrained: load ImageNet weights through torchvision/timm (their hubs: downloaded
            on first use, then read from their caches).
        weights: a local weight file instead (``model.weights``; see
            :mod:`gigapatch.models.weights`): a torchvision/timm state dict or a gigapatch
            checkpoint's encoder. timm models read a plain file through timm itself
            (``pretrained_cfg_overlay=dict(file=...)``), which adapts the classifier and the
            input channels its own way.
        checkpoint_activations: keep only the inputs of the encoder's stages during a forward
            pass with gradients and recompute the rest in backward
            (:func:`checkpoint_stages`): less memory for large patches, ~30 % more compute.
    """
    if not (isinstance(out_dim, int) and out_dim > 0):
        raise ConfigError(f"encoder out_dim must be a positive integer, got {out_dim!r}.")
    if not (isinstance(in_chans, int) and in_chans > 0):
        raise ConfigError(f"in_chans must be a positive integer, got {in_chans!r}.")
    if pretrained and weights:
        raise ConfigError("model.pretrained and model.weights both set: choose the hub "
                          "weights (pretrained: true) or the local file (weights: PATH).")
    if isinstance(name, str) and name.startswith("timm:"):
        timm_file = weights if weights and not is_gigapatch_checkpoint(weights) else None
        net = _timm_encoder(name[len("timm:") :], out_dim, in_chans, pretrained, timm_file)
        if weights and timm_file is None:
            load_weights(net, weights, f"encoder {name}")
    else:
        net = ENCODERS.get(name)(out_dim, in_chans, pretrained)
        if weights:
            load_weights(net, weights, f"encoder {name}")
    if checkpoint_activations:
        checkpoint_stages(net)
    return net


def checkpoint_stages(net: nn.Module) -> nn.Module:
    """Turn on activation checkpointing over ``net``'s stages, in place (state dict unchanged).

    timm models use their own ``set_grad_checkpointing``; torchvision ResNets checkpoint each
    residual block of ``layer1``–``layer4``; encoders with a ``features`` ``nn.Sequential``
    (``tiny_cnn``, ``resnet18_layer2``, MobileNets) checkpoint each of its blocks, and its
    plain layers in runs from one convolution to the next. Only forward passes with gradients are checkpointed (the no-grad fill is
    unchanged). Raises :class:`ConfigError` for a model with none of these structures.
    """
    if hasattr(net, "set_grad_checkpointing"):
        net.set_grad_checkpointing(True)
        return net
    layers = [getattr(net, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(layer, nn.Sequential) for layer in layers):
        for layer in layers:
            for block in layer:
                _checkpoint_forward(block)
        return net
    features = getattr(net, "features", None)
    if isinstance(features, nn.Sequential):
        runs = _runs(features)

        def forward(x: torch.Tensor) -> torch.Tensor:
            for run in runs:
                x = checkpoint(_apply, run, x, use_reentrant=False) if torch.is_grad_enabled() \
                    else _apply(run, x)
            return x

        features.forward = forward  # type: ignore[method-assign]
        return net
    raise ConfigError(
        f"model.checkpoint_activations: cannot find the stages of {type(net).__name__}; "
        "set model.checkpoint_activations: false for this encoder."
    )


def _runs(features: nn.Sequential) -> list[list[nn.Module]]:
    """``features`` cut into checkpoint segments: each block of a nested ``nn.Sequential``
    (ResNet layers) and each container (MobileNet blocks) alone; plain layers in runs that
    start at a convolution, so that no segment starts with an in-place op that would modify
    the previous segment's saved output."""
    runs: list[list[nn.Module]] = []
    after_block = True
    for module in features:
        if isinstance(module, nn.Sequential):
            runs += [[block] for block in module]
            after_block = True
        elif next(module.children(), None) is not None:
            runs.append([module])
            after_block = True
        elif after_block or isinstance(module, nn.Conv2d):
            runs.append([module])
            after_block = False
        else:
            runs[-1].append(module)
    return runs


def _apply(run: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for module in run:
        x = module(x)
    return x


def _checkpoint_forward(module: nn.Module) -> None:
    """Make ``module``'s forward recompute its activations in backward."""
    plain = module.forward

    def forward(*args: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return plain(*args)
        return checkpoint(plain, *args, use_reentrant=False)

    module.forward = forward  # type: ignore[method-assign]


def encoder_names() -> list[str]:
    """Names accepted by :func:`create_encoder` (besides ``timm:<model>``)."""
    return ENCODERS.names()


# --------------------------------------------------------------------------- tiny CNN


class TinyCNN(nn.Module):
    """A small, fast CNN: a 5×5 stem and two 3×3 convs, all stride 2, global max pool, linear.

    GroupNorm (not BatchNorm) keeps each patch's embedding independent of the other patches
    encoded with it, so PatchGD's no-grad fill and its inner steps see the same function.
    Global *max* pooling lets a small object anywhere in the input decide the output (with
    average pooling a 14-px digit in a mostly empty input learns several times slower).
    ``(B, in_chans, h, w)`` → ``(B, out_dim)``; total stride 8.
    """

    def __init__(self, out_dim: int, in_chans: int = 1, widths: tuple[int, ...] = (32, 64, 64)
                 ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_chans
        for i, w in enumerate(widths):
            k = 5 if i == 0 else 3
            layers += [
                nn.Conv2d(c, w, k, stride=2, padding=k // 2, bias=False),
                nn.GroupNorm(max(1, min(8, w // 4)), w),
                nn.ReLU(inplace=True),
            ]
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(c, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@ENCODERS.register("tiny_cnn")
def _tiny_cnn(out_dim: int, in_chans: int, pretrained: bool) -> nn.Module:
    if pretrained:
        raise ConfigError("tiny_cnn has no pretrained weights; set pretrained: false.")
    return TinyCNN(out_dim, in_chans)


@ENCODERS.register("tiny_cnn_small")
def _tiny_cnn_small(out_dim: int, in_chans: int, pretrained: bool) -> nn.Module:
    """:class:`TinyCNN` with widths 16/32/32: about 4× fewer operations, for CPU runs."""
    if pretrained:
        raise ConfigError("tiny_cnn_small has no pretrained weights; set pretrained: false.")
    return TinyCNN(out_dim, in_chans, widths=(16, 32, 32))


# --------------------------------------------------------------------------- torchvision


def _adapt_first_conv(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    """A copy of ``conv`` taking ``in_chans`` channels (pretrained RGB weights averaged/tiled)."""
    if conv.in_channels == in_chans:
        return conv
    new = nn.Conv2d(
        in_chans,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        mean = conv.weight.mean(dim=1, keepdim=True)  # (O, 1, k, k)
        new.weight.copy_(mean.repeat(1, in_chans, 1, 1) * (3 / in_chans))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _weights(pretrained: bool) -> str | None:
    return "DEFAULT" if pretrained else None


def _resnet(arch: str, out_dim: int, in_chans: int, pretrained: bool) -> nn.Module:
    net = getattr(torchvision.models, arch)(weights=_weights(pretrained))
    net.conv1 = _adapt_first_conv(net.conv1, in_chans)
    net.fc = nn.Linear(net.fc.in_features, out_dim)
    return net


for _arch in ("resnet18", "resnet34", "resnet50"):
    ENCODERS.register(_arch)(
        lambda out_dim, in_chans, pretrained, _a=_arch: _resnet(_a, out_dim, in_chans, pretrained)
    )


class ResNetLayer2(nn.Module):
    """ResNet-18 stem + ``layer1`` + ``layer2`` (stride 8, 128 channels), pool, linear."""

    def __init__(self, out_dim: int, in_chans: int, pretrained: bool) -> None:
        super().__init__()
        net = torchvision.models.resnet18(weights=_weights(pretrained))
        self.features = nn.Sequential(
            _adapt_first_conv(net.conv1, in_chans),
            net.bn1,
            net.relu,
            net.maxpool,
            net.layer1,
            net.layer2,
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


ENCODERS.register("resnet18_layer2")(ResNetLayer2)


def _mobilenet(arch: str, out_dim: int, in_chans: int, pretrained: bool) -> nn.Module:
    net = getattr(torchvision.models, arch)(weights=_weights(pretrained))
    first = net.features[0][0]
    net.features[0][0] = _adapt_first_conv(first, in_chans)
    last = net.classifier[-1]
    if arch == "mobilenet_v2":
        net.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last.in_features, out_dim))
    else:
        net.classifier[-1] = nn.Linear(last.in_features, out_dim)
    return net


for _arch in ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"):
    ENCODERS.register(_arch)(
        lambda out_dim, in_chans, pretrained, _a=_arch: _mobilenet(
            _a, out_dim, in_chans, pretrained
        )
    )


# --------------------------------------------------------------------------- timm


def _timm_encoder(model: str, out_dim: int, in_chans: int, pretrained: bool,
                  file: str | None = None) -> nn.Module:
    try:
        import timm
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError(
            f"encoder 'timm:{model}' needs timm: pip install 'gigapatch[timm]'."
        ) from None
    if not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise ConfigError(f"unknown timm model {model!r}.{hint}")
    if file is None:
        return timm.create_model(model, pretrained=pretrained, num_classes=out_dim,
                                 in_chans=in_chans)
    if not Path(file).is_file():
        raise ConfigError(f"model.weights: no file {file}.")
    try:  # timm's own way to read a local file: no hub access
        net = timm.create_model(model, pretrained=True, num_classes=out_dim, in_chans=in_chans,
                                pretrained_cfg_overlay={"file": str(file)})
    except (RuntimeError, KeyError, ValueError) as e:
        raise ConfigError(f"model.weights {file}: timm could not load it into "
                          f"timm:{model}: {str(e).splitlines()[0]}") from None
    log.info("model.weights: %s loaded into encoder timm:%s by timm", file, model)
    return net
