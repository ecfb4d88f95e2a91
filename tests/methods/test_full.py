"""Full-image training for segmentation: downsampled to fit, predicted masks at full size."""

import copy

import torch

from gigapatch.config import Config
from gigapatch.data.masks import Masks
from gigapatch.memory.budget import fit_to_budget, measure_method_peak
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
