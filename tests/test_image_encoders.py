import contextlib
import io
import urllib.error

import pytest
import torch
from torch import nn

import mmtag.models.image_encoders as ie
from mmtag.models.image_encoders import (
    IMAGE_ENCODERS,
    PretrainedWeightsUnavailable,
    build_image_encoder,
)

TOL = {"rtol": 1e-4, "atol": 1e-4}


def _images(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    """Smooth random images, normalised to about [-1, 1] like real ones."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 8, size // 8, generator=g)
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x * 2 - 1


@pytest.mark.parametrize(
    ("name", "out_dim", "num_stages", "normalisation"),
    [
        ("efficientnet_lite0", 1280, 9, "tf"),
        ("efficientnet_lite1", 1280, 9, "tf"),
        ("efficientnet_lite2", 1280, 9, "tf"),
        ("efficientnet_b0", 1280, 9, "imagenet"),
        ("resnet18", 512, 5, "imagenet"),
    ],
)
def test_output_shapes(name, out_dim, num_stages, normalisation):
    enc = build_image_encoder(name, pretrained=False).eval()
    assert (enc.out_dim, enc.num_stages, enc.normalisation) == (out_dim, num_stages, normalisation)
    x = _images(64)
    with torch.inference_mode():
        feats = enc.forward_features(x)
        pooled = enc(x)
    assert feats.shape == (2, out_dim, 2, 2)  # 64 / 32
    assert pooled.shape == (2, out_dim)
    torch.testing.assert_close(pooled, feats.mean(dim=(2, 3)))


def test_native_sizes_and_names():
    assert {n: build_image_encoder(n, pretrained=False).native_size for n in ie.LITE_ENCODERS} == {
        "efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
    assert len(set(IMAGE_ENCODERS)) == len(IMAGE_ENCODERS) == 10


def test_lite_pads_like_tensorflow_for_any_size():
    # 'SAME' padding gives ceil(size / 32); the package's padding baked for 224 px would not
    enc = build_image_encoder("efficientnet_lite0", pretrained=False).eval()
    with torch.inference_mode():
        assert enc.forward_features(_images(65, n=1)).shape == (1, 1280, 3, 3)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_run_stages_compose_to_forward_features(name):
    enc = build_image_encoder(name, pretrained=False).eval()
    x = _images(64)
    with torch.inference_mode():
        full = enc.forward_features(x)
        torch.testing.assert_close(enc.run_stages(x), full)
        for k in range(enc.num_stages + 1):
            torch.testing.assert_close(enc.run_stages(enc.run_stages(x, 0, k), k), full)
    with pytest.raises(ValueError, match="outside"):
        enc.run_stages(x, 2, 1)


def _stage_state(enc, i):
    grads = {p.requires_grad for p in enc.stages[i].parameters()}
    modes = {m.training for m in enc.stages[i].modules()}
    return grads, modes


def test_freeze_semantics():
    enc = build_image_encoder("efficientnet_lite0", pretrained=False, freeze=3)
    assert enc.frozen_stages == 3
    enc.train()
    for i in range(enc.num_stages):
        frozen = i < 3
        assert _stage_state(enc, i) == ({not frozen}, {not frozen}), i

    # a train-mode forward leaves the frozen BatchNorm statistics alone and updates the others
    frozen_bn = enc.stages[1].blocks[0]._bn1
    trained_bn = enc.stages[5].blocks[0]._bn1
    before = frozen_bn.running_mean.clone(), trained_bn.running_mean.clone()
    enc(_images(64))
    torch.testing.assert_close(frozen_bn.running_mean, before[0], rtol=0, atol=0)
    assert not torch.equal(trained_bn.running_mean, before[1])

    enc.freeze("all")
    assert enc.frozen_stages == enc.num_stages
    enc.train()
    assert not any(p.requires_grad for p in enc.parameters())
    assert not any(m.training for stage in enc.stages for m in stage.modules())

    enc.freeze("2")  # digit strings come from config files
    assert enc.frozen_stages == 2 and enc.training and enc.stages[2].training

    enc.freeze("none")
    enc.train()
    assert enc.frozen_stages == 0
    assert all(p.requires_grad for p in enc.parameters()) and all(m.training for m in enc.modules())

    for bad in (-1, enc.num_stages + 1, "some", True, 1.5):
        with pytest.raises(ValueError, match="freeze"):
            enc.freeze(bad)


def test_frozen_stages_are_deterministic_and_drop_path_is_configurable():
    enc = build_image_encoder("efficientnet_lite0", pretrained=False, freeze="all", drop_path=0.5)
    rates = [r for s in enc.stages[1:-1] for r in s.drop_rates]
    assert rates[0] == 0 and 0.4 < rates[-1] < 0.5  # linear in the block index, as the package does
    enc.train()
    x = _images(64)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), enc(x), rtol=0, atol=0)

    # unfrozen, the same rates make training-mode outputs random
    enc.freeze("none")
    enc.train()
    torch.manual_seed(0)
    with torch.no_grad():
        stem = enc.run_stages(x, 0, 1)
        assert not torch.equal(enc.run_stages(stem, 1, 8), enc.run_stages(stem, 1, 8))

    default = build_image_encoder("efficientnet_lite0", pretrained=False)
    assert max(r for s in default.stages[1:-1] for r in s.drop_rates) == pytest.approx(0.2 * 15 / 16)
    off = build_image_encoder("efficientnet_lite0", pretrained=False, drop_path=0.0)
    assert all(r == 0 for s in off.stages[1:-1] for r in s.drop_rates)
    with pytest.raises(ValueError, match="no stochastic depth"):
        build_image_encoder("resnet18", pretrained=False, drop_path=0.1)


def test_lite_random_init_needs_no_weight_file(monkeypatch):
    def missing(name):
        raise AssertionError("weights were looked up")

    monkeypatch.setattr(ie, "lite_weights_path", missing)
    build_image_encoder("efficientnet_lite2", pretrained=False)


def test_pretrained_lite0_reproduces_the_package_logits(capsys):
    from efficientnet_lite_pytorch import EfficientNet

    enc = build_image_encoder("efficientnet_lite0").eval()
    assert capsys.readouterr().out == ""  # the package's "Loaded pretrained weights" is silenced
    path = ie.lite_weights_path("efficientnet_lite0")
    with contextlib.redirect_stdout(io.StringIO()):
        package = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path,
                                               num_classes=1000).eval()
    x = _images(224)
    with torch.inference_mode():
        torch.testing.assert_close(package._fc(enc(x)), package(x), **TOL)

    # At another size the reference is the package with its padding baked for that size.
    state = torch.load(path, map_location="cpu", weights_only=True)
    at_240 = EfficientNet.from_name("efficientnet-lite0", image_size=240)
    at_240.load_state_dict(state)
    at_240.eval()
    x = _images(240)
    with torch.inference_mode():
        torch.testing.assert_close(package._fc(enc(x)), at_240(x), **TOL)


def test_torchvision_weights_offline_raise_a_helpful_error(monkeypatch, tmp_path):
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty weight cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(PretrainedWeightsUnavailable, match="efficientnet_lite") as info:
        build_image_encoder("resnet18", pretrained=True)
    message = str(info.value)
    assert "resnet18" in message and "pretrained: false" in message
    assert isinstance(info.value, RuntimeError)


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown image encoder 'vit_h'.*efficientnet_lite0"):
        build_image_encoder("vit_h")


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_inference_copy_folds_batchnorm_and_matches(name):
    enc = build_image_encoder(name, pretrained=False, freeze=2)
    g = torch.Generator().manual_seed(0)
    for m in enc.modules():  # non-trivial statistics, so that folding them is tested
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    enc.eval()
    fast = enc.for_inference()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert not any(p.requires_grad for p in fast.parameters()) and not fast.training
    x = _images(64)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), enc(x),
                                   **TOL)
        torch.testing.assert_close(fast.run_stages(x, 0, 3), enc.run_stages(x, 0, 3), **TOL)
    assert any(isinstance(m, nn.BatchNorm2d) for m in enc.modules())  # the original is untouched
    assert enc.frozen_stages == 2
    assert fast.for_inference() is fast  # folding twice is work for nothing (evaluate after load)


def test_training_step_backpropagates_through_unfrozen_stages():
    enc = build_image_encoder("efficientnet_lite0", pretrained=False, freeze=4).train()
    enc(_images(64)).sum().backward()  # in-place activations must not break autograd
    assert all(p.grad is None for p in enc.stages[:4].parameters())
    assert all(p.grad is not None for p in enc.stages[4:].parameters())
