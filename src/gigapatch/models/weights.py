"""Local weight files for θ1 (``model.weights: PATH``): pretrained encoders without a network.

:func:`load_weights` reads a state dict from disk and loads it into a network built by
:mod:`gigapatch.models.encoders` or :mod:`gigapatch.models.dense`. Accepted files:

- a torchvision or timm checkpoint (``.pth``/``.pt``/``.bin`` from ``torch.save``, or
  ``.safetensors``): a bare state dict, or a dict holding it under ``state_dict``, ``model``
  or ``module`` (as many training scripts save it); ``module.`` prefixes (DistributedDataParallel)
  are removed;
- a gigapatch ``best.pt``/``last.pt``: its encoder θ1 (the ``encoder.*`` entries; for the
  ``full`` and ``patchwise`` methods, whose one network is ``net.*``, those), so one run can be
  fine-tuned from another.

Keys are matched by name; when the file's names are a suffix of the network's (an ImageNet
ResNet into the ``encoder`` of an ``smp:unet:resnet18``), the common prefix is found and added.
Two shape differences are expected and handled, everything else is refused with the key and
both shapes:

- the network's *output layer* (the last module with parameters: ``fc``, ``classifier``, a
  segmentation head) is new: gigapatch sizes it to the latent channels ``C``, so a file's
  1000-class classifier is left out;
- the *first convolution* of a file made for RGB, loaded into a network with another number of
  input channels: its weights are averaged over the file's channels and tiled (scaled by
  ``3 / in_chans``), as torchvision and timm adapt their own pretrained stems.

One line reports what was loaded, missing and unexpected (see :class:`WeightsReport`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gigapatch.core.errors import ConfigError

__all__ = ["WeightsReport", "is_gigapatch_checkpoint", "load_weights", "output_layer_prefix", "read_state_dict"]

log = logging.getLogger("gigapatch")

_WRAPPERS = ("state_dict", "model", "module")


@dataclass
class WeightsReport:
    """What :func:`load_weights` did: loaded / missing / unexpected keys, the output layer
    left out, the adapted first convolution and the prefix added to the file's keys."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    new_output: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    prefix: str = ""

    def line(self) -> str:
        """The one-line summary logged at INFO."""
        parts = [f"model.weights: {len(self.loaded)} tensors loaded from {self.path}"]
        if self.prefix:
            parts.append(f"file keys prefixed with {self.prefix!r}")
        parts.append(f"{len(self.missing)} missing{_few(self.missing)}")
        parts.append(f"{len(self.unexpected)} unexpected{_few(self.unexpected)}")
        if self.new_output:
            parts.append(f"new output layer kept as initialised{_few(self.new_output)}")
        if self.adapted:
            parts.append(f"input channels adapted{_few(self.adapted)}")
        return "; ".join(parts)


def _few(keys: list[str], n: int = 3) -> str:
    if not keys:
        return ""
    more = f", … {len(keys) - n} more" if len(keys) > n else ""
    return " (" + ", ".join(keys[:n]) + more + ")"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weight file (see the module doc for the accepted layouts), on the CPU.

    Raises :class:`ConfigError` naming the file when it is missing, unreadable or holds no
    state dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.weights: no file {path}. Give the path of a .pth/.pt/"
                          ".safetensors state dict or of a gigapatch best.pt.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # noqa: PLC0415 - optional (timm's dep)

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=False)
    except ImportError:
        raise ConfigError(f"model.weights: {path} is a .safetensors file: pip install "
                          "safetensors (it comes with timm).") from None
    except Exception as e:  # noqa: BLE001 - any decode failure means the same to the user
        raise ConfigError(f"model.weights: cannot read {path}: {e}") from None
    if isinstance(state, dict) and "config" in state and isinstance(state.get("model"), dict):
        return _gigapatch_encoder(state["model"], path)
    for key in _WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(
            isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.weights: {path} holds no state dict (a mapping of names to "
                          "tensors, possibly under 'state_dict' or 'model').")
    return {k.removeprefix("module."): v for k, v in state.items()}


def is_gigapatch_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a gigapatch checkpoint (read memory-mapped: cheap for big files)."""
    path = Path(path)
    if path.suffix == ".safetensors" or not path.is_file():
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - not a zip-format torch file: not one of ours
        return False
    return isinstance(state, dict) and "config" in state and isinstance(state.get("model"), dict)


def _gigapatch_encoder(model: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """θ1 of a gigapatch checkpoint's ``model`` entries: ``encoder.*`` (else ``net.*``)."""
    for prefix in ("encoder.", "net."):
        found = {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}
        if found:
            return found
    raise ConfigError(f"model.weights: the gigapatch checkpoint {path} has no encoder "
                      "(no 'encoder.*' or 'net.*' weights).")


def output_layer_prefix(net: nn.Module) -> str:
    """Name prefix (``'fc.'``) of the last module of ``net`` that owns parameters."""
    last = ""
    for name, module in net.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
            last = name
    return last + "." if last else ""


def _first_conv(net: nn.Module) -> str | None:
    """State-dict key of the weight of ``net``'s first ``Conv2d``."""
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{name}.weight" if name else "weight"
    return None


def _prefix(own: set[str], keys: list[str]) -> str:
    """The prefix that, added to the file's ``keys``, matches most of the network's keys
    (``''`` when the names already match as often as any prefix does)."""
    counts: dict[str, int] = {"": sum(k in own for k in keys)}
    suffixes = set(keys)
    for name in own:
        for i, ch in enumerate(name):
            if ch == "." and name[i + 1:] in suffixes:
                counts[name[: i + 1]] = counts.get(name[: i + 1], 0) + 1
    return max(counts, key=lambda p: (counts[p], p == ""))


def _adapt_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A first-conv weight ``(O, C_file, k, k)`` for ``in_chans`` inputs: mean over the file's
    channels, tiled, scaled by ``3 / in_chans`` (torchvision/timm convention)."""
    return weight.mean(dim=1, keepdim=True).repeat(1, in_chans, 1, 1) * (3 / in_chans)


def load_weights(net: nn.Module, path: str | Path, what: str = "the encoder") -> WeightsReport:
    """Load the weight file ``path`` into ``net`` in place; log and return the report.

    ``what`` names the network in messages (e.g. ``"encoder resnet18"``). Raises
    :class:`ConfigError` for an unreadable file, a file sharing no key with ``net``, or a
    tensor whose shape differs from ``net``'s (key and both shapes in the message) other than
    the new output layer and an adaptable first convolution."""
    state = read_state_dict(path)
    own = net.state_dict()
    prefix = _prefix(set(own), list(state))
    state = {prefix + k: v for k, v in state.items()}
    report = WeightsReport(str(path), prefix=prefix)
    out, first = output_layer_prefix(net), _first_conv(net)
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        want = own[key].shape
        if value.shape == want:
            merged[key] = value
        elif out and key.startswith(out):
            report.new_output.append(key)
        elif (key == first and value.dim() == 4 and value.shape[0] == want[0]
              and value.shape[2:] == want[2:]):
            merged[key] = _adapt_channels(value.float(), want[1]).to(own[key].dtype)
            report.adapted.append(f"{key} {value.shape[1]}→{want[1]}")
        else:
            raise ConfigError(
                f"model.weights {path}: {key} has shape {tuple(value.shape)} in the file but "
                f"{tuple(want)} in {what}. Is the file made for this model.encoder?")
    if not merged:
        raise ConfigError(
            f"model.weights {path}: none of its {len(state)} tensors matches {what} "
            f"(file keys like {', '.join(list(state)[:3])}; {what} has keys like "
            f"{', '.join(list(own)[:3])}). Is the file made for this model.encoder?")
    net.load_state_dict(merged, strict=False)
    report.loaded = list(merged)
    report.missing = [k for k in own if k not in merged and k not in report.new_output
                      and not k.endswith("num_batches_tracked")]
    log.info("%s into %s", report.line(), what)
    return report
