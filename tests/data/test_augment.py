"""data.augment: lazy images transformed region by region equal the transformed image."""

import itertools

import numpy as np
import pytest
import tifffile
import torch

from gigapatch.config import Config
from gigapatch.core.errors import ConfigError
from gigapatch.core.grid import PatchGrid
from gigapatch.data.augment import AugmentedDataset, AugmentedView, Params, augment_tensor, draw_params
from gigapatch.data.batch import LazyBatch
from gigapatch.data.datasets import open_dataset
from gigapatch.io.readers import open_image


@pytest.fixture
def image(tmp_path):
    """A 96×160 RGB tiled TIFF (one level: its grey mean is exact) and its pixels."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (96, 160, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "i.tiff", pixels, tile=(32, 32), photometric="rgb")
    return tmp_path / "i.tiff", torch.from_numpy(pixels).permute(2, 0, 1)


GEOMETRIC = [Params(rot, h, v) for rot, h, v in itertools.product(range(4), (0, 1), (0, 1))]


@pytest.mark.parametrize("p", GEOMETRIC, ids=lambda p: f"rot{p.rot}h{int(p.hflip)}v{int(p.vflip)}")
def test_every_patch_of_a_transformed_lazy_image_equals_the_transformed_image(image, p):
    path, pixels = image
    want = augment_tensor(pixels, p)  # (C, H', W') in memory
    view = AugmentedView(open_image(path), p)
    assert view.shape == (want.shape[1], want.shape[2], 3)
    batch = LazyBatch([view])
    grid = PatchGrid(view.shape[0], view.shape[1], 32)
    got = grid.taker(batch)(torch.zeros(grid.num_patches, dtype=torch.long),
                            torch.arange(grid.num_patches))  # (N, C, 32, 32)
    ref = grid.taker(want[None])(torch.zeros(grid.num_patches, dtype=torch.long),
                                 torch.arange(grid.num_patches))
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    np.testing.assert_array_equal(view.read_region(7, 11, 30, 50),  # an unaligned region
                                  want.permute(1, 2, 0).numpy()[7:37, 11:61])


def test_colour_jitter_is_one_draw_for_all_patches_of_an_image(image):
    path, pixels = image
    torch.manual_seed(3)
    p = draw_params(["hflip", "rot90", "color_jitter"])
    assert p.colour and p.order
    want = augment_tensor(pixels, p).permute(1, 2, 0).numpy()
    view = AugmentedView(open_image(path), p)
    h, w = view.shape[:2]
    for y, x in [(0, 0), (h - 20, w - 20), (17, 5)]:  # patches share the image's factors
        np.testing.assert_allclose(view.read_region(y, x, 20, 20).astype(int),
                                   want[y : y + 20, x : x + 20].astype(int), atol=1)


def test_the_training_split_is_augmented_afresh_and_the_held_out_split_not(image, tmp_path):
    path, pixels = image
    (tmp_path / "t.csv").write_text(f"path,label\n{path.name},1\n")
    cfg = Config()
    cfg.data.kind, cfg.data.num_classes, cfg.data.in_chans = "lazy_csv", 2, 3
    cfg.data.train_csv = cfg.data.val_csv = str(tmp_path / "t.csv")
    cfg.data.augment = ["hflip", "vflip", "rot90"]
    train = open_dataset(cfg.validate(), "train")
    assert isinstance(train, AugmentedDataset)
    assert not isinstance(open_dataset(cfg, "val"), AugmentedDataset)
    torch.manual_seed(0)
    views = [train[0][0] for _ in range(16)]
    assert {v.shape[:2] for v in views} == {(96, 160)}  # not square: half turns only
    assert {getattr(v, "p", Params()).rot for v in views} == {0, 2}
    cfg.data.augment = ["mixup"]
    with pytest.raises(ConfigError, match="unknown \\['mixup'\\]"):
        cfg.validate()


def test_in_memory_images_are_transformed_as_tensors(image, tmp_path):
    path, pixels = image
    ds = AugmentedDataset([(pixels, 0)], ["vflip"])
    torch.manual_seed(1)
    seen = {bool(torch.equal(ds[0][0], pixels.flip(1))) for _ in range(10)}
    assert seen == {True, False}


@pytest.mark.parametrize("p", GEOMETRIC[1::3], ids=lambda p: f"rot{p.rot}h{int(p.hflip)}v{int(p.vflip)}")
def test_masks_follow_their_image(tmp_path, p):
    """A segmentation pair: the lazy mask's windows equal the in-memory transformed mask,
    and stay aligned with the transformed image."""
    from PIL import Image

    from gigapatch.data.masks import Masks, MaskReader
    from gigapatch.data.augment import AugmentedMask, augment_mask

    rng = np.random.default_rng(1)
    ids = rng.integers(0, 3, (96, 160), dtype=np.uint8)
    Image.fromarray(ids).save(tmp_path / "m.png")
    tifffile.imwrite(tmp_path / "m.tiff", ids, tile=(32, 32))
    want = augment_mask(torch.from_numpy(ids.astype(np.int64)), p)
    for path in ("m.png", "m.tiff"):
        lazy = AugmentedMask(MaskReader(tmp_path / path, 3), p)
        assert lazy.shape == tuple(want.shape)
        np.testing.assert_array_equal(lazy.read(), want.numpy())
        boxes = torch.tensor([[0, 0, 32, 32], [want.shape[0] - 32, want.shape[1] - 32, 32, 32]])
        got = Masks([lazy]).crop([0, 0], boxes)
        torch.testing.assert_close(got, Masks([want]).crop([0, 0], boxes))
    # aligned with the image: a pixel and its class move together
    image = torch.from_numpy(ids)[None]  # the ids as a one-channel image
    torch.testing.assert_close(augment_tensor(image, p)[0].long(), want)


@pytest.mark.parametrize("p", GEOMETRIC, ids=lambda p: f"rot{p.rot}h{int(p.hflip)}v{int(p.vflip)}")
def test_detection_boxes_move_with_their_pixels(p):
    from gigapatch.data.augment import augment_boxes

    image = torch.zeros(1, 96, 160, dtype=torch.uint8)
    box = torch.tensor([[30.0, 10, 70, 25]])  # x0, y0, x1, y1
    image[0, 10:25, 30:70] = 255
    moved = augment_tensor(image, p)[0]
    ys, xs = torch.nonzero(moved, as_tuple=True)
    want = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]).float()
    torch.testing.assert_close(augment_boxes(box, p, (96, 160)), want)


def test_detection_targets_are_augmented_with_their_images():
    image = torch.zeros(1, 64, 64, dtype=torch.uint8)
    image[0, 5:15, 40:60] = 255
    target = {"boxes": torch.tensor([[40.0, 5, 60, 15]]), "labels": torch.tensor([1])}
    ds = AugmentedDataset([(image, target)], ["hflip", "vflip", "rot90"], boxes=True)
    torch.manual_seed(0)
    for _ in range(8):
        img, t = ds[0]
        ys, xs = torch.nonzero(img[0], as_tuple=True)
        got = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]).float()
        torch.testing.assert_close(t["boxes"], got)
