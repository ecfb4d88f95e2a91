"""Run configuration: typed dataclasses, YAML files, ``--set key=value`` overrides.

A config has five sections (``data``, ``task``, ``model``, ``method``, ``train``) plus
``name`` and ``seed``. A config without a ``task`` section is a classification config
(``task.kind: classify``), as every config was before tasks had their own section. Unknown keys and wrongly typed values are refused with a :class:`ConfigError` that
names the key, suggests close matches and says what is expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from gigapatch.core.errors import ConfigError
from gigapatch.core.units import parse_bytes

#: ``train.precision`` choices: float32, bfloat16 autocast, float16 autocast + loss scaling.
PRECISIONS = ("32", "bf16", "16-mixed")


#: The augmentations ``data.augment`` accepts (:mod:`gigapatch.data.augment`).
AUGMENTATIONS = ("hflip", "vflip", "rot90", "color_jitter")


@dataclass
class DataConfig:
    """Where the images are and what to predict.

    ``kind: csv``: CSV files hold ``path,label`` (paths relative to the CSV), decoded whole.
    ``kind: lazy_csv``: the same CSVs, read patch by patch from disk (tiled TIFF, slides, …).
    ``kind: folder``: ``root/{train,val}/<class>/<image>``, read patch by patch.
    ``kind: megapixel_mnist``: a Megapixel MNIST folder ``root`` (splits ``train``/``test``).
    Segmentation (``task.kind: segment``): the CSVs list ``path`` and ``mask_column``; a
    folder holds ``root/{train,val}/images`` and ``root/{train,val}/<mask_dir>`` with matching
    file names; ``num_classes`` counts the background (class 0).
    ``tasks``: the labels to predict, e.g. ``[majority, max, top, multi]`` (empty: the single
    label of a CSV); the first is the main task (validation accuracy, best checkpoint). For
    CSVs each task is a column (``label`` the label column; multi-label columns list the
    classes present, e.g. ``"2 5 7"``).
    Tasks in ``multilabel`` are multi-hot (sigmoid/BCE), the others single-label (softmax/CE);
    every task has ``num_classes`` outputs.
    CSV columns: ``path_column`` (default ``path``; e.g. PANDA's ``image_id`` with
    ``path_suffix: .tiff``) and ``label_column`` (default ``label``; PANDA ``isup_grade``);
    paths are relative to ``image_root`` (default: the CSV's folder).
    ``augment``: training-image augmentations drawn per image and epoch, applied to lazy
    images region by region without decoding them whole: ``hflip``, ``vflip``, ``rot90``,
    ``color_jitter`` (:mod:`gigapatch.data.augment`).
    Resolution (``lazy_csv``, ``folder``): ``level: L`` reads pyramid level L, ``mpp: 0.5``
    the coarsest level with at most that many microns per pixel, from the slide's metadata
    (:mod:`gigapatch.io.resolution`); training and ``predict`` both use it. Segmentation
    masks are presented at the level (:mod:`gigapatch.data.masks`); detection refuses a level
    (its boxes are level-0 pixels).
    ``skip_background`` (images read from disk): an Otsu foreground mask on a low-resolution
    level (``background`` auto/bright/dark, optional fixed ``mask_threshold``) marks empty
    patches, which PatchGD gives a fixed (zero) embedding and IPS never scores.
    ``category_ids`` (detection): the COCO category id of each label 1..K, in order; filled
    from the training JSON when empty (and saved with the checkpoint), so predictions are
    written with the data set's own ids. The held-out JSON must list the same categories.
    """

    kind: str = "csv"
    train_csv: str = "data/ultramnist/train.csv"
    val_csv: str = "data/ultramnist/test.csv"
    root: str | None = None
    tasks: list[str] = field(default_factory=list)
    multilabel: list[str] = field(default_factory=list)
    skip_background: bool = False
    background: str = "auto"
    mask_threshold: float | None = None
    num_classes: int = 10
    in_chans: int = 1
    num_workers: int = 0
    mean: float = 0.0
    std: float = 1.0
    mask_column: str = "mask"
    mask_dir: str = "masks"
    path_column: str = "path"
    label_column: str = "label"
    path_suffix: str = ""
    image_root: str | None = None
    level: int | None = None
    mpp: float | None = None
    augment: list[str] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)


@dataclass
class TaskConfig:
    """What is predicted: ``kind`` names a registered task (``classify``, ``multilabel``).

    The label heads and classes are described with the data (``data.tasks``,
    ``data.multilabel``, ``data.num_classes``). ``metrics``: held-out metrics
    (``accuracy``; ``kappa`` = quadratic-weighted Cohen's kappa of the main head).
    ``monitor``: the metric (or ``loss``) that chooses ``best.pt``.
    """

    kind: str = "classify"
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])
    monitor: str = "accuracy"


@dataclass
class ModelConfig:
    """θ1 (encoder) and θ2 (head) by name; ``latent_dim`` is the channel count C of Z.

    Starting weights of θ1: ``pretrained: true`` fetches ImageNet weights through the
    torchvision/timm/segmentation-models-pytorch hubs (a download on first use, then their
    caches); ``weights: PATH`` loads a local file instead, no network needed: a torchvision or
    timm state dict, or a gigapatch ``best.pt`` (its encoder; see
    :mod:`gigapatch.models.weights`). ``freeze_encoder: true`` keeps θ1 fixed (no gradients,
    eval mode): only θ2 and the heads learn.

    Dense PatchGD's θ2: ``head_layers`` 3×3 convs of ``head_width`` channels; ``head_film:
    true`` also modulates each of them by the global summary of Z (FiLM: ``h·(1 + γ(P)) +
    β(P)``), so that a pixel's label can depend on how its features compare with the whole
    image's (see :class:`~gigapatch.models.heads.DenseHead`).

    Speed of PatchGD's no-gradient fill: ``channels_last: true`` keeps the networks and the
    patches in the channels-last memory layout (faster convolutions on many CPUs and on
    tensor-core GPUs); ``compile: true`` runs the fill's encoder through ``torch.compile``
    (a compile on first use and after each mode change; the weights are shared, checkpoints
    unchanged).
    """

    encoder: str = "tiny_cnn"
    pretrained: bool = False
    latent_dim: int = 64
    head: str = "conv"
    head_width: int = 64
    head_pool: str = "avg"
    attn_heads: int = 8
    attn_dropout: float = 0.0
    checkpoint_activations: bool = False
    head_layers: int = 2
    head_film: bool = False
    weights: str | None = None
    freeze_encoder: bool = False
    channels_last: bool = False
    compile: bool = False


@dataclass
class MethodConfig:
    """Training method and its settings (fields a method does not use are ignored by it)."""

    name: str = "patchgd"
    patch_size: int = 32
    stride: int | None = None
    sample_fraction: float = 0.25
    inner_steps: int | None = None
    accumulate: bool = True
    fill_chunk: int = 256
    fill_mode: str = "train"
    global_context: str = "none"
    downsample_to: int | None = None
    memory_size: int = 100
    iter_size: int = 100
    pos_encoding: bool = True
    patch_weighting: str = "mean"
    hard_fraction: float = 0.25
    pool: str = "mean"
    z_stride: int = 4
    z_pool: str = "mean"
    z_on_disk: bool = False
    z_cache_budget: str = "4GiB"
    z_cache: str = "none"
    z_cache_checkpoint: str = "2GiB"
    z_max_age: int | None = None
    z_refresh: float | None = None
    z_cache_warmup: int = 0
    z_tolerance: float | None = None
    z_correct: bool = False
    selection_refresh: float | None = None


@dataclass
class TrainConfig:
    """Optimisation, schedule, logging and memory settings.

    ``logger``: ``csv`` (``metrics.csv`` and the PNG curves, always written) or
    ``tensorboard`` (also TensorBoard event files in ``<run>/tensorboard``; the
    ``tensorboard`` extra). ``encoder_lr``: learning rate of θ1 (the encoder) when it should differ from ``lr``
    (θ2 and the heads); ``null``: one rate for all.

    ``memory_budget``: fit the method's settings so that one training step needs at most
    this much memory of the training device (e.g. ``2GiB``; :mod:`gigapatch.memory.budget`).
    ``budget_counts_host_maps`` (CPU only): whether PatchGD's host-resident maps Z count in
    that budget. On CUDA they live in host memory and never do; on a CPU they share the
    memory with everything else, so they count by default. ``false`` prices a CPU run as a GPU
    would hold it (to emulate a GPU budget, as the detection benchmark does).

    ``val_every``: validate after every N-th epoch and after the last one (held-out passes
    over gigapixel images can cost more than an epoch of training); ``best.pt`` is chosen
    among the validated epochs, and the other epochs' rows have no ``val_*`` values.
    """

    epochs: int = 10
    batch_size: int = 8
    optimizer: str = "adamw"
    lr: float = 1e-3
    encoder_lr: float | None = None
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    schedule: str = "cosine"
    grad_clip: float | None = None
    precision: str = "32"
    sync_batchnorm: bool = False
    device: str = "auto"
    out_dir: str = "runs"
    memory_budget: str | None = None
    budget_counts_host_maps: bool = True
    measure_memory: bool = True
    progress: bool = True
    logger: str = "csv"
    max_train_batches: int | None = None
    val_every: int = 1


@dataclass
class Config:
    """A whole run."""

    name: str = "run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-serialisable)."""
        return asdict(self)

    def validate(self) -> Config:
        """Check value ranges and choices; returns ``self``."""
        _check(self.data.num_classes >= 2, "data.num_classes", self.data.num_classes, "≥ 2")
        _check(self.data.in_chans >= 1, "data.in_chans", self.data.in_chans, "≥ 1")
        ids = self.data.category_ids
        _check(not ids or (len(set(ids)) == len(ids) == self.data.num_classes
                           and all(isinstance(i, int) and i >= 1 for i in ids)),
               "data.category_ids", ids, f"empty, or data.num_classes = "
               f"{self.data.num_classes} distinct integer ids ≥ 1")
        _check(self.data.std > 0, "data.std", self.data.std, "> 0")
        _check(self.data.num_workers >= 0, "data.num_workers", self.data.num_workers,
               "≥ 0 (0 = load in the main process)")
        d = self.data
        _choice("data.kind", d.kind, ("csv", "lazy_csv", "folder", "megapixel_mnist"))
        unknown = [n for n in d.augment if n not in AUGMENTATIONS]
        if unknown:
            raise ConfigError(f"data.augment: unknown {unknown}; choose from "
                              f"{list(AUGMENTATIONS)}.")
        if d.level is not None or d.mpp is not None:
            if d.level is not None and d.mpp is not None:
                raise ConfigError("data.level and data.mpp are both set: choose one.")
            _check(d.level is None or d.level >= 0, "data.level", d.level, "≥ 0")
            _check(d.mpp is None or d.mpp > 0, "data.mpp", d.mpp, "> 0 (microns per pixel)")
            if d.kind not in ("lazy_csv", "folder"):
                raise ConfigError(f"data.level / data.mpp choose a pyramid level of images read "
                                  f"from disk: use data.kind lazy_csv or folder (not {d.kind}).")
            if self.task.kind == "detect":
                raise ConfigError("data.level / data.mpp are not supported for detection yet "
                                  "(its boxes are in level-0 pixels); write the images and "
                                  "boxes at the resolution to train at.")
        _choice("data.background", d.background, ("auto", "bright", "dark"))
        if d.kind in ("megapixel_mnist", "folder"):
            _check(bool(d.root), "data.root", d.root, f"the {d.kind} data folder")
        if d.kind == "megapixel_mnist":
            _check(bool(d.tasks), "data.tasks", d.tasks,
                   "a list of tasks, e.g. [majority] or [majority, max, top, multi]")
        _check(len(set(d.tasks)) == len(d.tasks), "data.tasks", d.tasks, "no repeated task")
        for task in d.multilabel:
            _choice("data.multilabel", task, tuple(d.tasks))
        _check(self.model.attn_heads >= 1, "model.attn_heads", self.model.attn_heads, "≥ 1")
        _check(0 <= self.model.attn_dropout < 1, "model.attn_dropout", self.model.attn_dropout,
               "in [0, 1)")
        _check(self.model.latent_dim >= 1, "model.latent_dim", self.model.latent_dim, "≥ 1")
        _choice("model.head_pool", self.model.head_pool, ("avg", "max"))
        m = self.method
        _check(m.patch_size >= 1, "method.patch_size", m.patch_size, "≥ 1")
        _check(
            0 < m.sample_fraction <= 1, "method.sample_fraction", m.sample_fraction, "in (0, 1]"
        )
        _check(
            m.inner_steps is None or m.inner_steps >= 1,
            "method.inner_steps",
            m.inner_steps,
            "≥ 1 or null (= ceil(1/sample_fraction))",
        )
        _check(m.fill_chunk >= 1, "method.fill_chunk", m.fill_chunk, "≥ 1")
        _choice("method.fill_mode", m.fill_mode, ("train", "eval"))
        _choice("method.global_context", m.global_context, ("none", "add", "concat"))
        _choice("method.patch_weighting", m.patch_weighting, ("mean", "top_k_loss"))
        _check(0 < m.hard_fraction <= 1, "method.hard_fraction", m.hard_fraction,
               "in (0, 1] (the share of the sampled patches with the highest loss trained on)")
        _choice("method.pool", m.pool, ("mean", "max", "logsumexp"))
        _choice("method.z_pool", m.z_pool, ("mean", "gated", "share"))
        _check(m.z_pool != "share" or self.model.latent_dim >= 2, "model.latent_dim",
               self.model.latent_dim, "≥ 2 with method.z_pool: share (Z's channels are class "
               "scores: the background and at least one class)")
        _choice("method.z_cache", m.z_cache, ("none", "epoch", "refresh"))
        _check(m.z_max_age is None or m.z_max_age >= 0, "method.z_max_age", m.z_max_age,
               "≥ 0 optimizer steps or null")
        _check(m.z_cache_warmup >= 0, "method.z_cache_warmup", m.z_cache_warmup,
               "≥ 0 optimizer steps (the first steps fill Z exactly, every cell re-encoded)")
        _check(m.z_refresh is None or 0 < m.z_refresh <= 1, "method.z_refresh", m.z_refresh,
               "in (0, 1] (the share of cached cells re-encoded per step, oldest first) or null")
        for key in ("z_cache_budget", "z_cache_checkpoint"):
            try:
                parse_bytes(getattr(m, key))
            except ConfigError as err:
                raise ConfigError(f"method.{key}: {err}") from None
        if m.z_cache != "none" and m.name != "patchgd":
            raise ConfigError(f"method.z_cache = {m.z_cache} caches PatchGD's latent grid; "
                              f"method {m.name!r} has none (leave method.z_cache: none).")
        _check(m.selection_refresh is None or 0 < m.selection_refresh <= 1,
               "method.selection_refresh", m.selection_refresh,
               "in (0, 1] (IPS: the share of the patches scored per step besides the previous "
               "top-M) or null (score all)")
        if m.selection_refresh is not None and m.name != "ips":
            raise ConfigError(f"method.selection_refresh is IPS's; method {m.name!r} does not "
                              "select patches (leave it null).")
        _check(m.z_tolerance is None or m.z_tolerance > 0, "method.z_tolerance",
               m.z_tolerance, "> 0 (the relative change ‖z_new − z_old‖ / ‖z_new‖ of the "
               "re-encoded cached cells the refresh share aims at) or null")
        if m.z_tolerance is not None and (m.z_cache != "refresh" or m.z_refresh is None):
            raise ConfigError(f"method.z_tolerance = {m.z_tolerance} steers the share of "
                              "cached cells re-encoded per visit: it needs method.z_cache: "
                              "refresh with method.z_refresh (the least share), not "
                              f"z_cache = {m.z_cache}, z_refresh = {m.z_refresh}.")
        if m.z_correct and m.z_cache != "refresh":
            raise ConfigError("method.z_correct maps the cached cells by the change measured "
                              "on the re-encoded ones: it needs method.z_cache: refresh (now "
                              f"{m.z_cache}).")
        if m.z_cache == "refresh" and (m.z_max_age is None) == (m.z_refresh is None):
            raise ConfigError("method.z_cache = refresh re-encodes the cached cells older than "
                              "method.z_max_age optimizer steps, or the oldest share "
                              "method.z_refresh of them: set exactly one of the two "
                              f"(now z_max_age = {m.z_max_age}, z_refresh = {m.z_refresh}).")
        _check(m.z_stride >= 1, "method.z_stride", m.z_stride,
               "≥ 1 (pixels per latent-map pixel, dense PatchGD)")
        _check(self.model.head_layers >= 0, "model.head_layers", self.model.head_layers,
               "≥ 0 (3×3 convs of the dense θ2)")
        _check(m.memory_size >= 1, "method.memory_size", m.memory_size, "≥ 1 (IPS's M)")
        _check(m.iter_size >= 1, "method.iter_size", m.iter_size, "≥ 1 (IPS's I)")
        t = self.train
        _check(t.epochs >= 1, "train.epochs", t.epochs, "≥ 1")
        _check(t.val_every >= 1, "train.val_every", t.val_every, "≥ 1 (1: every epoch)")
        _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "≥ 1")
        _check(t.lr > 0, "train.lr", t.lr, "> 0")
        _choice("train.logger", t.logger, ("csv", "tensorboard"))
        _check(t.encoder_lr is None or t.encoder_lr > 0, "train.encoder_lr", t.encoder_lr,
               "> 0 or null")
        _check(t.warmup_epochs >= 0, "train.warmup_epochs", t.warmup_epochs, "≥ 0")
        _choice("train.optimizer", t.optimizer, ("adamw", "adam", "sgd"))
        _choice("train.schedule", t.schedule, ("cosine", "linear", "constant"))
        _choice("train.precision", t.precision, PRECISIONS)
        _check(bool(self.task.metrics), "task.metrics", self.task.metrics,
               "at least one metric, e.g. [accuracy]")
        if t.memory_budget is not None:
            parse_bytes(t.memory_budget)
        return self


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is invalid: expected {expected}.")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key} = {value!r} is invalid.{hint} Choose one of {list(choices)}.")


# --------------------------------------------------------------------------- building


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build a :class:`Config` from nested dicts, refusing unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}.")
    return _build(Config, raw, prefix="", source=source).validate()


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config and apply ``key=value`` overrides (dotted keys, YAML values)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}. Pass an existing YAML file.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    for item in overrides or []:
        apply_override(raw, item)
    return config_from_dict(raw, source=str(path))


def _section_of(key: str) -> str | None:
    """The one section that has a field ``key`` (``None`` if none or several do)."""
    owners = [
        f.name for f in fields(Config)
        if dataclasses.is_dataclass(f.default_factory)  # type: ignore[arg-type]
        and key in {g.name for g in fields(f.default_factory)}  # type: ignore[arg-type]
    ]
    return owners[0] if len(owners) == 1 else None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` override to a nested dict (value parsed as YAML).

    A bare ``key=value`` whose key belongs to exactly one section is put there
    (``memory_budget=2GiB`` is ``train.memory_budget=2GiB``).
    """
    if "=" not in item:
        raise ConfigError(f"--set expects key=value (e.g. train.epochs=5), got {item!r}.")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    top_level = {f.name for f in fields(Config)}
    section = _section_of(parts[0]) if len(parts) == 1 and parts[0] not in top_level else None
    if section:
        parts = [section, parts[0]]
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {p!r} is not a section.")
    node[parts[-1]] = value


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _build(cls: type, raw: dict[str, Any], prefix: str, source: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean {prefix + close[0]!r}?" if close else ""
            raise ConfigError(
                f"{source}: unknown key {full!r}.{hint} "
                f"Known keys here: {', '.join(prefix + k for k in known)}."
            )
        hint_t = hints[key]
        if dataclasses.is_dataclass(hint_t):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {full!r} must be a section (mapping).")
            kwargs[key] = _build(hint_t, value, prefix=f"{full}.", source=source)
        else:
            kwargs[key] = _coerce(value, hint_t, full, source)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list:
        if isinstance(value, str):  # --set data.tasks=majority,max
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} = {value!r} has the wrong type: expected a list.")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(float(value)):
            raise ConfigError(f"{source}: {key} = nan is invalid.")
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(
        f"{source}: {key} = {value!r} has the wrong type: expected {tp.__name__}"
        + (" or null" if type(None) in args else "")
        + "."
    )
