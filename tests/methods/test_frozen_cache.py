"""The keys PatchGD's Z cache and IPS's selection reuse know an image by."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from gigapatch.methods.frozen_cache import image_keys


def test_in_memory_images_are_known_by_their_bytes_shape_and_dtype():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (3, 1, 40, 30), dtype=torch.uint8)
    images[2] = images[0]
    keys = image_keys(images)
    assert keys[0] == keys[2] != keys[1]
    assert image_keys(images.clone()) == keys  # content, not identity
    moved = images.clone()
    moved[0, 0, 39, 29] ^= 1  # one bit of one pixel
    assert image_keys(moved)[0] != keys[0]
    assert image_keys(moved)[1:] == keys[1:]
    as_float = image_keys(images.float())[0]
    assert as_float != keys[0] and as_float[1:] == ((1, 40, 30), "torch.float32")
    transposed = images.transpose(-1, -2)  # not contiguous: hashed by its values
    assert image_keys(transposed) == image_keys(transposed.contiguous())
    assert image_keys(images.reshape(3, 1, 30, 40))[0] != keys[0]  # same bytes, other shape
    half = image_keys(images.to(torch.bfloat16))  # dtypes numpy has no name for
    assert half[0] == half[2] != half[1]


def test_fake_tensors_have_no_key():
    with FakeTensorMode():
        fake = torch.empty(2, 1, 8, 8)
    assert image_keys(fake) == [None, None]
