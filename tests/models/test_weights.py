"""model.weights: local weight files into θ1 (torchvision, timm, smp, gigapatch checkpoints)."""

import logging

import pytest
import torch
import torchvision

from gigapatch.config import Config
from gigapatch.core.errors import ConfigError
from gigapatch.engine.checkpoint import save_checkpoint
from gigapatch.methods import create_method
from gigapatch.models.dense import create_dense_net
from gigapatch.models.encoders import create_encoder
from gigapatch.models.weights import load_weights, read_state_dict


@pytest.fixture
def resnet_file(tmp_path):
    """An ImageNet-shaped torchvision ResNet-18 (RGB stem, 1000-class fc), random weights."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_torchvision_file_loads_with_new_output_layer_and_adapted_stem(resnet_file, caplog):
    path, state = resnet_file
    with caplog.at_level(logging.INFO, logger="gigapatch"):
        net = create_encoder("resnet18", 16, in_chans=1, weights=str(path))
    own = net.state_dict()
    torch.testing.assert_close(own["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])
    torch.testing.assert_close(own["bn1.running_mean"], state["bn1.running_mean"])
    # grayscale stem: the RGB kernels averaged, × 3 / in_chans
    torch.testing.assert_close(own["conv1.weight"],
                               state["conv1.weight"].mean(1, keepdim=True) * 3.0)
    assert own["fc.weight"].shape == (16, 512)  # the new output layer is kept as built
    line = [r.getMessage() for r in caplog.records if "model.weights" in r.getMessage()]
    assert len(line) == 1
    assert "0 missing" in line[0] and "0 unexpected" in line[0]
    assert "new output layer" in line[0] and "fc.weight" in line[0]
    assert "conv1.weight 3→1" in line[0]


def test_wrapped_and_ddp_prefixed_state_dicts(resnet_file, tmp_path):
    _, state = resnet_file
    path = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    got = read_state_dict(path)
    assert set(got) == set(state)
    net = create_encoder("resnet18", 8, in_chans=3, weights=str(path))
    torch.testing.assert_close(net.state_dict()["conv1.weight"], state["conv1.weight"])


def test_shape_mismatch_is_refused_with_key_and_both_shapes(resnet_file, tmp_path):
    _, state = resnet_file
    state = dict(state)
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"layer2\.0\.conv1\.weight has shape \(128, 64, 5, 5\) "
                                          r"in the file but \(128, 64, 3, 3\)"):
        create_encoder("resnet18", 8, weights=str(path))


def test_unrelated_file_missing_file_and_both_sources_are_refused(tmp_path, resnet_file):
    path = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(3)}, path)
    with pytest.raises(ConfigError, match="none of its 1 tensors matches"):
        create_encoder("tiny_cnn", 8, weights=str(path))
    with pytest.raises(ConfigError, match="no file"):
        create_encoder("tiny_cnn", 8, weights=str(tmp_path / "nope.pth"))
    with pytest.raises(ConfigError, match="choose"):
        create_encoder("resnet18", 8, pretrained=True, weights=str(resnet_file[0]))
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        create_encoder("tiny_cnn", 8, weights=str(text))


def _cfg(**model) -> Config:
    cfg = Config(seed=0)
    cfg.data.num_classes, cfg.data.in_chans = 3, 1
    cfg.model.encoder, cfg.model.latent_dim, cfg.model.head_width = "tiny_cnn", 8, 16
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg.validate()


def test_a_gigapatch_checkpoint_gives_its_encoder_to_another_run(tmp_path):
    torch.manual_seed(1)
    cfg = _cfg()
    trained = create_method(cfg)
    path = tmp_path / "best.pt"
    save_checkpoint({"model": trained.state_dict(), "config": cfg.to_dict()}, path)
    torch.manual_seed(2)
    tuned = create_method(_cfg(weights=str(path)))
    for (name, a), b in zip(trained.encoder.state_dict().items(),
                            tuned.encoder.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert not torch.equal(trained.head.fc.weight, tuned.head.fc.weight)  # θ2 starts afresh
    # IPS from a PatchGD run: the same encoder, a different output size (new output layer)
    ips_cfg = _cfg(weights=str(path), latent_dim=16)
    ips_cfg.method.name = "ips"
    ips = create_method(ips_cfg.validate())
    torch.testing.assert_close(ips.encoder.features[0].weight, trained.encoder.features[0].weight)


def test_timm_reads_a_local_file_the_timm_way(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    src = timm.create_model("test_efficientnet", num_classes=1000)
    path = tmp_path / "timm.pth"
    torch.save(src.state_dict(), path)
    net = create_encoder("timm:test_efficientnet", 8, in_chans=3, weights=str(path))
    key = next(k for k in src.state_dict() if k.startswith("blocks.") and k.endswith("weight"))
    torch.testing.assert_close(net.state_dict()[key], src.state_dict()[key])
    assert net.get_classifier().out_features == 8


def test_smp_encoder_from_a_torchvision_imagenet_file(resnet_file):
    pytest.importorskip("segmentation_models_pytorch")
    path, state = resnet_file
    net = create_dense_net("smp:unet:resnet18", 4, in_chans=3, weights=str(path))
    torch.testing.assert_close(net.state_dict()["net.encoder.layer4.1.conv2.weight"],
                               state["layer4.1.conv2.weight"])


def test_load_weights_reports_missing_keys(tmp_path):
    net = create_dense_net("tiny_unet", 4, in_chans=1)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("net.dec1.")}
    path = tmp_path / "part.pth"
    torch.save(state, path)
    report = load_weights(create_dense_net("tiny_unet", 4, in_chans=1), path)
    assert report.missing and all(k.startswith("net.dec1.") for k in report.missing)
    assert f"{len(report.missing)} missing" in report.line()
