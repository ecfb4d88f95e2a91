"""Streaming from disk: a LazyBatch gives the methods exactly what the in-memory batch gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from gigapatch.config import Config
from gigapatch.core.grid import PatchGrid
from gigapatch.data.batch import LazyBatch, ShardedSampler, read_resized
from gigapatch.core.errors import DataError
from gigapatch.io.readers import open_image
from gigapatch.methods.base import create_method
from gigapatch.step import StepContext


def _tiff(path, array: np.ndarray, tile: int = 32, levels: int = 2):
    """A tiled pyramidal TIFF of ``array`` (H, W) uint8; lower levels by 2× striding."""
    with tifffile.TiffWriter(path) as tif:
        tif.write(array, tile=(tile, tile), subifds=levels - 1, compression="zlib")
        for level in range(1, levels):
            f = 2**level
            tif.write(array[::f, ::f], tile=(tile, tile), subfiletype=1, compression="zlib")
    return path


@pytest.fixture
def pair(tmp_path):
    """Two 100×120 images on disk (grid of 32-px patches does not divide them) and in memory."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (100, 120), dtype=np.uint8) for _ in range(2)]
    readers = [open_image(_tiff(tmp_path / f"{i}.tif", a)) for i, a in enumerate(arrays)]
    tensor = torch.from_numpy(np.stack(arrays))[:, None]  # (2, 1, 100, 120)
    return LazyBatch(readers), tensor


def _cfg(name: str, **method) -> Config:
    cfg = Config()
    cfg.method.name = name
    cfg.data.num_classes = 3
    cfg.model.latent_dim = 8
    cfg.model.head_width = 8
    cfg.model.attn_heads = 2
    cfg.method.patch_size = 32
    cfg.method.fill_chunk = 5
    cfg.method.memory_size, cfg.method.iter_size = 3, 4
    for key, value in method.items():
        setattr(cfg.method, key, value)
    return cfg.validate()


def test_patches_read_from_disk_equal_the_in_memory_patches(pair):
    lazy, tensor = pair
    grid = PatchGrid(100, 120, 32, 24)  # overlapping, padded last row and column
    index = torch.tensor([[0, 4, grid.num_patches - 1], [7, 3, 19]])
    assert torch.equal(grid.gather(lazy, index), grid.gather(tensor, index))


def test_streamed_patchgd_fill_equals_the_in_memory_fill(pair):
    lazy, tensor = pair
    torch.manual_seed(0)
    method = create_method(_cfg("patchgd")).eval()
    grid = method.grid(tensor)
    with torch.no_grad():
        assert torch.equal(method.fill(lazy, grid), method.fill(tensor, grid))


def test_streamed_ips_selects_and_trains_like_in_memory(pair):
    lazy, tensor = pair
    torch.manual_seed(0)
    method = create_method(_cfg("ips"))
    with torch.no_grad():
        torch.manual_seed(5)
        a = method.select(lazy)
        torch.manual_seed(5)
        b = method.select(tensor)
    assert torch.equal(a, b)
    opt = torch.optim.SGD(method.parameters(), lr=0.0)
    torch.manual_seed(6)
    la = method.train_step(lazy, torch.tensor([0, 2]), StepContext(method, opt))
    torch.manual_seed(6)
    lb = method.train_step(tensor, torch.tensor([0, 2]), StepContext(method, opt))
    assert la == pytest.approx(lb, rel=1e-6)


def test_global_patch_and_downsampling_read_a_pyramid_level(pair, monkeypatch):
    lazy, tensor = pair
    levels_read = []
    original = type(lazy.readers[0]).read_region

    def spy(self, y, x, h, w, level=0, **kw):
        levels_read.append(level)
        return original(self, y, x, h, w, level=level, **kw)

    monkeypatch.setattr(type(lazy.readers[0]), "read_region", spy)
    method = create_method(_cfg("patchgd", global_context="concat"))
    g = method.global_patch(lazy)
    assert g.shape == (2, 1, 32, 32) and levels_read == [1, 1]  # 50×60 level, not 100×120
    full = create_method(_cfg("full", downsample_to=48))
    assert full.host_transform(lazy).shape == (2, 1, 40, 48)
    assert levels_read[2:] == [1, 1]
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(lazy.readers[0].read_region(0, 0, 50, 60, level=1)).permute(2, 0, 1)[None],
        size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    assert torch.equal(read_resized(lazy.readers[0], (32, 32)), ref[0])


def test_resized_view_of_an_image_without_pyramid_reads_strips(tmp_path, monkeypatch):
    """A single-level image much larger than the view is box-averaged strip by strip: no read
    exceeds the strip budget, and the view equals the same filter applied in memory."""
    import gigapatch.data.batch as lazy_module

    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (203, 170, 3), dtype=np.uint8)  # boxes overhang both edges
    np.save(tmp_path / "plain.npy", array)
    reader = open_image(tmp_path / "plain.npy")
    assert len(reader.levels) == 1
    monkeypatch.setattr(lazy_module, "STRIP_PIXELS", 2_000)
    reads = []
    original = type(reader).read_region

    def spy(self, y, x, h, w, level=0, **kw):
        reads.append(h * w)
        return original(self, y, x, h, w, level=level, **kw)

    monkeypatch.setattr(type(reader), "read_region", spy)
    view = read_resized(reader, (30, 24))  # factor min(203 // 30, 170 // 24) = 6
    assert len(reads) > 1 and max(reads) <= 2_000 and sum(reads) == 203 * 170

    full = torch.from_numpy(array).permute(2, 0, 1)[None].double()
    box = torch.nn.functional.avg_pool2d(full, 6, ceil_mode=True)  # (1, 3, 34, 29)
    box = (box + 0.5).floor().to(torch.uint8)
    ref = torch.nn.functional.interpolate(box, size=(30, 24), mode="bilinear", antialias=True,
                                          align_corners=False)[0]
    assert view.shape == (3, 30, 24) and view.dtype == torch.uint8
    assert torch.equal(view, ref)


def test_batches_of_different_sizes_are_refused(tmp_path):
    a = open_image(_tiff(tmp_path / "a.tif", np.zeros((64, 64), np.uint8)))
    b = open_image(_tiff(tmp_path / "b.tif", np.zeros((64, 96), np.uint8)))
    with pytest.raises(DataError, match="differ in size"):
        LazyBatch([a, b])


def test_training_on_a_lazy_csv_data_set(tmp_path):
    from gigapatch.synth.gigapixel import generate_gigapixel
    from gigapatch.engine.loop import train

    root = tmp_path / "giga"
    generate_gigapixel(root, n_train=4, n_test=2, side=512, tile=128, n_noise=4, seed=0,
                       progress=False)
    cfg = _cfg("patchgd", patch_size=128, sample_fraction=0.25, inner_steps=2)
    cfg.name = "lazy"
    cfg.data.kind = "lazy_csv"
    cfg.data.train_csv, cfg.data.val_csv = str(root / "train.csv"), str(root / "test.csv")
    cfg.data.num_classes = 10
    cfg.train.epochs, cfg.train.batch_size, cfg.train.progress = 1, 2, False
    cfg.train.out_dir = str(tmp_path / "runs")
    summary = train(cfg)
    assert summary["image_size"] == 512 and summary["peak_memory_bytes"] > 0
    assert json.loads((tmp_path / "runs" / "lazy" / "summary.json").read_text())["epochs"] == 1


@pytest.fixture
def sparse(tmp_path):
    """A 128×128 canvas (4×4 grid of 32-px cells) with content in cells 1, 6 and 15 only."""
    array = np.zeros((128, 128), np.uint8)
    for cell in (1, 6, 15):
        i, j = divmod(cell, 4)
        array[i * 32 + 8 : i * 32 + 20, j * 32 + 5 : j * 32 + 25] = 200
    return LazyBatch([open_image(_tiff(tmp_path / "sparse.tif", array, levels=1))]), array


def _skipping(name: str) -> Config:
    cfg = _cfg(name, memory_size=2, iter_size=1)
    cfg.data.skip_background, cfg.data.background, cfg.data.mask_threshold = True, "dark", 0
    return cfg


def _count_encoded(method):
    seen = []
    method.encoder.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    return seen


def test_background_cells_are_skipped_exactly(sparse):
    lazy, array = sparse
    grid = PatchGrid(128, 128, 32)
    assert lazy.foreground(grid, "dark", 0)[0].nonzero().flatten().tolist() == [1, 6, 15]
    torch.manual_seed(0)
    method = create_method(_skipping("patchgd")).eval()
    seen = _count_encoded(method)
    with torch.no_grad():
        z = method.fill(lazy, grid, mask=method.foreground(lazy, grid))
        full = method.fill(torch.from_numpy(array)[None, None], grid)
    assert sum(seen) == 3 + 16  # masked fill: the 3 foreground patches; reference: all 16
    fg = torch.tensor([1, 6, 15])
    torch.testing.assert_close(z[0, fg], full[0, fg])  # same patches (other chunk sizes)
    assert not z[0, [c for c in range(16) if c not in (1, 6, 15)]].any()  # fixed embedding 0


def test_ips_never_reads_or_scores_background(sparse):
    lazy, _ = sparse
    torch.manual_seed(0)
    method = create_method(_skipping("ips"))
    seen = _count_encoded(method)
    for seed in range(5):
        torch.manual_seed(seed)
        cells = method.select(lazy)
        assert set(cells[0].tolist()) <= {1, 6, 15} and cells.shape == (1, 2)
    assert sum(seen) == 5 * 3  # 2 buffer + 1 chunk of 1 per selection: the 3 foreground cells


@pytest.mark.parametrize(("size", "world", "pad"), [(10, 1, True), (10, 3, True), (10, 3, False),
                                                    (2, 4, False), (7, 2, True)])
def test_sharded_sampler_length_matches_its_indices(size, world, pad):
    shares = [list(ShardedSampler(size, shuffle=True, seed=3, rank=r, world=world, pad=pad))
              for r in range(world)]
    for r, share in enumerate(shares):
        assert len(ShardedSampler(size, shuffle=True, seed=3, rank=r, world=world, pad=pad)) \
            == len(share)
    if not pad:  # every index exactly once over the processes
        assert sorted(i for s in shares for i in s) == list(range(size))


def _backend_files(tmp_path):
    """The same 200×300 RGB image in every reader backend's format."""
    import numpy as np
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)
    files = {"tiff-tiles": tmp_path / "t.tiff", "tiff-strips": tmp_path / "s.tif",
             "pillow": tmp_path / "p.png", "numpy": tmp_path / "n.npy"}
    tifffile.imwrite(files["tiff-tiles"], pixels, tile=(64, 64), photometric="rgb")
    tifffile.imwrite(files["tiff-strips"], pixels, photometric="rgb", rowsperstrip=16)
    Image.fromarray(pixels).save(files["pillow"])
    np.save(files["numpy"], pixels)
    return pixels, files


def test_thread_pool_reads_equal_serial_reads_for_every_backend(tmp_path, monkeypatch):
    import gigapatch.data.batch as batch_module
    from gigapatch.core.grid import PatchGrid
    from gigapatch.data.batch import LazyBatch
    from gigapatch.io.readers import open_image

    pixels, files = _backend_files(tmp_path)
    readers = {name: open_image(path) for name, path in files.items()}
    try:
        import openslide  # noqa: F401

        readers["openslide"] = open_image(files["tiff-tiles"], backend="openslide")
    except ImportError:
        pass
    grid = PatchGrid(200, 300, 48, 40)  # overlapping, past the edges: padded patches
    cells = torch.randperm(grid.num_patches)
    for name, reader in readers.items():
        batch = LazyBatch([reader, reader])
        images = torch.arange(len(cells)) % 2
        monkeypatch.setattr(batch_module, "IO_THREADS", 1)
        serial = grid.taker(batch)(images, cells)
        monkeypatch.setattr(batch_module, "IO_THREADS", 8)
        pooled = grid.taker(batch)(images, cells)
        assert torch.equal(serial, pooled), name
        want = grid.taker(torch.from_numpy(pixels).permute(2, 0, 1)[None].expand(2, -1, -1, -1))
        assert torch.equal(pooled, want(images, cells)), name


def test_read_ahead_yields_in_order_and_raises_where_the_error_is():
    from gigapatch.data.batch import read_ahead

    seen = [(i, int(t)) for i, t in read_ahead(lambda i: torch.tensor(i * i), [1, 2, 3])]
    assert seen == [(1, 1), (2, 4), (3, 9)]

    def read(i):
        if i == 2:
            raise ValueError("bad chunk 2")
        return torch.tensor(i)

    got = []
    with pytest.raises(ValueError, match="bad chunk 2"):
        for i, _ in read_ahead(read, [1, 2, 3]):
            got.append(i)
    assert got == [1]


def test_pooled_reads_work_under_inference_mode(tmp_path):
    """Grad and inference modes are per thread: patches read by the pool into a tensor made
    under ``inference_mode`` (as predict does) must still arrive."""
    from gigapatch.core.grid import PatchGrid
    from gigapatch.data.batch import LazyBatch, read_ahead
    from gigapatch.io.readers import open_image

    pixels, files = _backend_files(tmp_path)
    batch = LazyBatch([open_image(files["tiff-tiles"])])
    grid = PatchGrid(200, 300, 64)
    take = grid.taker(batch)
    with torch.inference_mode():
        got = take(torch.zeros(6, dtype=torch.long), torch.arange(6))
        ahead = [t for _, t in read_ahead(lambda c: take(torch.zeros(2, dtype=torch.long), c),
                                          [torch.arange(0, 2), torch.arange(2, 4)])]
    ref = grid.taker(torch.from_numpy(pixels).permute(2, 0, 1)[None])
    assert torch.equal(got, ref(torch.zeros(6, dtype=torch.long), torch.arange(6)))
    assert torch.equal(torch.cat(ahead), got[:4])


def test_read_chunks_reads_ahead_from_disk_and_as_needed_in_memory(tmp_path):
    from gigapatch.core.grid import PatchGrid
    from gigapatch.data.batch import LazyBatch, read_chunks
    from gigapatch.io.readers import open_image

    pixels, files = _backend_files(tmp_path)
    memory = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    grid = PatchGrid(200, 300, 64)
    chunks = [torch.arange(0, 3), torch.arange(3, 5), torch.arange(5, 8)]
    zero = torch.zeros(3, dtype=torch.long)
    seen = []
    for images in (LazyBatch([open_image(files["tiff-tiles"])]), memory):
        take = grid.taker(images)
        read = lambda c: seen.append(int(c[0])) or take(zero[: len(c)], c)  # noqa: E731
        got = list(read_chunks(images, read, chunks, torch.device("cpu")))
        assert [int(c[0]) for c, _ in got] == [0, 3, 5]
        assert torch.equal(torch.cat([t for _, t in got]), grid.taker(memory)(
            torch.zeros(8, dtype=torch.long), torch.arange(8)))
        assert not got[0][1].is_pinned()  # page-locked only for a CUDA device
    seen.clear()
    lazy = read_chunks(memory, read, chunks, torch.device("cpu"))
    next(lazy)
    assert seen == [0]  # in memory nothing is read ahead
