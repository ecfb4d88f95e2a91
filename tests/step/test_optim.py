"""train.encoder_lr (θ1's own rate) and model.freeze_encoder (θ1 fixed, in eval mode)."""

import copy

import pytest
import torch

from gigapatch.data.datasets import CSVImageDataset
from gigapatch.methods.base import create_method
from gigapatch.step import StepContext, make_optimizer


def _batch(cfg):
    ds = CSVImageDataset(cfg.data.train_csv, num_classes=cfg.data.num_classes)
    images = torch.stack([ds[i][0] for i in range(4)])
    targets = torch.stack([ds[i][1] for i in range(4)])
    return images, targets


@pytest.mark.parametrize("method", ["patchgd", "ips", "full", "patchwise"])
def test_encoder_lr_puts_theta1_in_its_own_group(tiny_config, method):
    cfg = copy.deepcopy(tiny_config)
    cfg.method.name, cfg.train.lr, cfg.train.encoder_lr = method, 1e-3, 1e-5
    m = create_method(cfg.validate())
    opt = make_optimizer(m, cfg, m.encoder_parameters())
    head, enc = opt.param_groups
    assert head["lr"] == 1e-3 and enc["lr"] == 1e-5
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())  # each exactly once
    assert {id(p) for p in enc["params"]} == {id(p) for p in m.encoder_parameters()}
    if method in ("full", "patchwise"):  # the one network's output layer learns at train.lr
        assert {id(p) for p in m.net.fc.parameters()} <= {id(p) for p in head["params"]}


def test_without_encoder_lr_there_is_one_group(tiny_config):
    m = create_method(tiny_config)
    assert len(make_optimizer(m, tiny_config, m.encoder_parameters()).param_groups) == 1


@pytest.mark.parametrize("method", ["patchgd", "full"])
def test_a_frozen_encoder_does_not_change_and_stays_in_eval_mode(tiny_config, method):
    torch.manual_seed(0)
    cfg = copy.deepcopy(tiny_config)
    cfg.method.name, cfg.model.freeze_encoder = method, True
    cfg.model.encoder = "resnet18_layer2"  # batch norm: eval mode must keep its statistics
    cfg.method.patch_size = 32
    m = create_method(cfg.validate())
    before = copy.deepcopy(m.state_dict())
    m.train()
    theta1 = m.encoder if method == "patchgd" else m.net
    assert not theta1.training
    assert all(not p.requires_grad for p in m.encoder_parameters())
    if method == "full":
        assert m.net.fc.training and m.net.fc.weight.requires_grad
    opt = make_optimizer(m, cfg, m.encoder_parameters())
    images, targets = _batch(cfg)
    ctx = StepContext(m, opt)
    for _ in range(2):
        m.train_step(m.host_transform(images), targets, ctx)
    after = m.state_dict()
    prefix = "encoder." if method == "patchgd" else "net."
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    frozen = {k for k in changed if k.startswith(prefix) and not k.startswith("net.fc.")}
    assert not frozen, frozen  # weights and running statistics alike
    assert changed, "θ2 / the output layer must learn"
