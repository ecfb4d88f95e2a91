"""Full-image training for segmentation: downsampled to fit, predicted masks at full size."""

import copy

import torch

from gigapatch.config import Config
from gigapatch.data.masks import Masks
from gigapatch.memory.budget import fit_to_budget, measure_method_peak
import gigapatch.methods.base as base_module
from gigapatch.methods.base import create_method
from gigapatch.step import StepContext


def _cfg(**method) -> Config:
    cfg = Config()
    cfg.task.kind = "segment"
    cfg.data.num_classes, cfg.data.in_chans = 2, 1
    cfg.model.encoder = "tiny_unet"
    cfg.method.name = "full"
    for k, v in method.items():
        setattr(cfg.method, k, v)
    cfg.train.batch_size = 2
    return cfg.validate()


def test_downsampled_segmentation_is_trained_and_predicted_at_full_mask_size():
    torch.manual_seed(0)
    method = create_method(_cfg(downsample_to=24))
    images = torch.randint(0, 256, (2, 1, 48, 48), dtype=torch.uint8)
    masks = method.task.random_targets(2, (48, 48))
    small = method.host_transform(images)
    assert small.shape[-2:] == (24, 24)
    ctx = StepContext(method, torch.optim.SGD(method.parameters(), lr=0.0))
    loss = method.train_step(small, masks, ctx)
    with torch.no_grad():  # trained against the mask resized to the input (nearest)
        low = method.logits(small)
        resized = Masks([m[::2, ::2] for m in masks.full()])
        assert abs(loss - float(method.task.loss(low, resized))) < 1e-5
    method.eval()
    with torch.no_grad():
        assert method.predict(images).shape == (2, 2, 48, 48)


def test_budget_picks_a_downsampled_side_for_segmentation():
    cfg = _cfg()
    shape = (1, 128, 128)
    at64 = copy.deepcopy(cfg)
    at64.method.downsample_to = 64
    budget = measure_method_peak(at64, shape) + 1000
    fit_to_budget(cfg, shape, budget, "cpu")
    # The fake-tensor estimate of a dense step is 64 KiB (0.5 %) above the measurement here,
    # so the budget may stop one 4-px step short of the measured largest side (64): safe side.
    assert cfg.method.downsample_to is not None and cfg.method.downsample_to >= 60
    assert measure_method_peak(cfg, shape) <= budget


def test_streamed_mask_blocks_equal_the_upsampled_prediction(monkeypatch):
    """The mask comes band by band (16 rows here) from the downsampled logits, never
    upsampled whole; its ids equal the argmax of the whole upsampled prediction."""
    monkeypatch.setattr(base_module, "MASK_BLOCK", 16)
    torch.manual_seed(1)
    method = create_method(_cfg(downsample_to=24)).double().eval()
    images = torch.randint(0, 256, (1, 1, 40, 45), dtype=torch.uint8)
    with torch.no_grad():
        want = method.predict(images)[0].argmax(dim=0).to(torch.uint8)
        block, blocks = method.mask_blocks(images)
        got = torch.zeros(40, 45, dtype=torch.uint8)
        for y, x, ids in blocks:
            assert ids.shape[0] <= 16 and ids.shape[1] <= 16
            got[y : y + ids.shape[0], x : x + ids.shape[1]] = ids
    assert block == 16 and torch.equal(got, want)
