"""Segmentation task: loss windows, global (not per-image) metrics, upsampling."""

import torch
import torch.nn.functional as F

from gigapatch.config import Config
from gigapatch.data.masks import IGNORE, Masks
from gigapatch.tasks import create_task
from gigapatch.tasks.segment import dice_loss, fit_rows, fit_to


def _task(k: int = 3):
    cfg = Config()
    cfg.task.kind, cfg.data.num_classes = "segment", k
    return create_task(cfg)


def test_dice_loss_against_its_definition():
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0, 0] = IGNORE
    p = logits.softmax(1)
    valid = target != IGNORE
    want = []
    for c in (1, 2):
        t = (target == c) & valid
        pc = p[:, c] * valid
        want.append((2 * (pc * t).sum() + 1) / (pc.sum() + t.sum() + 1))
    torch.testing.assert_close(dice_loss(logits, target), 1 - torch.stack(want).mean())


def test_dice_loss_leaves_out_classes_absent_from_the_batch():
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    target = torch.zeros(2, 4, 5, dtype=torch.long)
    loss = dice_loss(logits, target)  # no foreground at all: only the cross-entropy counts
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and not logits.grad.any()
    target[1, 2, 3] = 2  # class 2 present, class 1 absent: the mean is over class 2 only
    p = logits.detach().softmax(1)[:, 2]
    t = (target == 2).float()
    want = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    torch.testing.assert_close(dice_loss(logits.detach(), target), want)


def test_window_loss_is_the_loss_on_the_cropped_masks():
    task = _task()
    masks = task.random_targets(2, (20, 20))
    out = torch.randn(2, 3, 8, 8)
    image, boxes = torch.tensor([0, 1]), torch.tensor([[2, 3, 8, 8], [16, 16, 8, 8]])
    got = task.loss(out, masks, (image, boxes))
    crop = masks.crop(image, boxes)  # the second window reaches past the border: ignored
    assert (crop[1, 4:] == IGNORE).all()
    want = F.cross_entropy(out, crop, ignore_index=IGNORE) + dice_loss(out, crop)
    torch.testing.assert_close(got, want)


def test_low_resolution_output_trains_on_the_resized_mask_and_scores_at_full_size():
    task = _task(2)
    mask = torch.zeros(16, 16, dtype=torch.long)
    mask[::4, ::4] = 1  # exactly the pixels a nearest 4× reduction keeps
    masks = Masks([mask])
    low = torch.randn(1, 2, 4, 4)
    small = Masks([torch.ones(4, 4, dtype=torch.long)])
    torch.testing.assert_close(task.loss(low, masks), task.loss(low, small))
    m = task.metrics()
    m.update(low, masks)  # metrics: logits upsampled to the 16×16 mask
    up = F.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False).argmax(1)
    want = float((up[0] == mask).double().mean())
    assert abs(float(m.compute()["pixel_accuracy"]) - want) < 1e-6


def test_metrics_count_all_pixels_of_the_set_not_per_image_means():
    task = _task(2)
    m = task.metrics()
    # Image 1: 100 foreground pixels, all found. Image 2: 4 foreground pixels, none found.
    t1 = torch.zeros(20, 20, dtype=torch.long)
    t1[:10, :10] = 1
    t2 = torch.zeros(20, 20, dtype=torch.long)
    t2[:2, :2] = 1
    for target, pred in ((t1, t1), (t2, torch.zeros_like(t2))):
        logits = F.one_hot(pred, 2).permute(2, 0, 1)[None].float() * 10
        m.update(logits, Masks([target]))
    values = m.compute()
    # Global Dice of class 1: 2·100 / (100 + 104); per-image averaging would give (1 + 0) / 2.
    assert abs(float(values["dice_1"]) - 200 / 204) < 1e-6
    assert abs(float(values["dice"]) - 200 / 204) < 1e-6
    assert abs(float(values["iou_1"]) - 100 / 104) < 1e-6
    assert abs(float(values["pixel_accuracy"]) - 796 / 800) < 1e-6


def test_prediction_reports_class_fractions():
    task = _task(3)
    out = torch.zeros(1, 3, 2, 2)
    out[0, 2, 0, :] = 1.0
    assert task.prediction(out)["class_fractions"] == {"0": 0.5, "1": 0.0, "2": 0.5}


def test_fit_rows_equals_the_whole_bilinear_resize_band_by_band():
    torch.manual_seed(0)
    for (h, w), size in (((7, 9), (40, 45)), ((24, 24), (48, 50)), ((5, 5), (5, 11))):
        logits = torch.randn(3, h, w, dtype=torch.float64)
        want = fit_to(logits[None], size)[0]
        for top, rows in ((0, 16), (16, 16), (size[0] - 3, 3)):
            if top >= size[0]:
                continue
            rows = min(rows, size[0] - top)
            torch.testing.assert_close(fit_rows(logits, size, top, rows),
                                       want[:, top : top + rows], rtol=1e-12, atol=1e-12)
