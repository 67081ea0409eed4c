"""Load a model to dissect from a short spec string, and fingerprint its weights.

Specs understood by `load_model`:

    mobilenet_v2                  MobileNetV2 defined here (no torchvision needed); its
                                  state_dict keys equal torchvision's, so torchvision's
                                  ImageNet weights load with strict=True
    torchvision:resnet50          any torchvision.models factory (needs torchvision)
    package.module:factory        import the module, call the factory with no arguments
                                  (an nn.Module instance is used as it is)
    path/to/model.pt              a TorchScript file (torch.jit.load)

`weights` is an optional state_dict file (.pth/.pt via torch.load(weights_only=True),
or .safetensors via the `safetensors` package), loaded with strict=True.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["MobileNetV2", "mobilenet_v2", "load_model", "load_state_dict_file",
           "weights_fingerprint"]


# -- MobileNetV2 (Sandler et al. 2018), laid out like torchvision's so keys match ------

def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channel counts to a multiple of `divisor`, never dropping more than 10 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNReLU6(nn.Sequential):
    """conv -> batch norm -> ReLU6; children 0, 1, 2 as in torchvision's Conv2dNormActivation."""

    def __init__(self, inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear projection (1x1), residual when shapes match."""

    def __init__(self, inp: int, out: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_residual = stride == 1 and inp == out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion t, output channels c, repeats n, first stride s), from the paper's Table 2
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        channels = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(3, channels, stride=2)]
        for t, c, n, s in self.SETTINGS:
            out = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        features.append(ConvBNReLU6(channels, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def mobilenet_v2(num_classes: int = 1000) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes)


_BUILTIN = {"mobilenet_v2": mobilenet_v2}


# -- weights --------------------------------------------------------------------------

def load_state_dict_file(path: str | os.PathLike) -> dict:
    """Read a state_dict from .pth/.pt (torch.load, weights_only) or .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"weights file {str(path)!r} is .safetensors but the 'safetensors' "
                              "package is not installed (pip install safetensors)") from None
        return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise ValueError(f"weights file {str(path)!r} is not a readable state_dict: {e}") from None
    # Training checkpoints often wrap the weights.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"weights file {str(path)!r} holds a {type(state).__name__}, not a state_dict")
    return state


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state_dict file into `model` with strict=True; name what does not match."""
    state = load_state_dict_file(path)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    missing, unexpected = _key_mismatch(model, state)
    if missing or unexpected:
        raise ValueError(f"weights file {str(path)!r} does not fit the model: "
                         f"{len(missing)} missing keys {missing[:3]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:3]}")
    model.load_state_dict(state, strict=True)


def _key_mismatch(model: nn.Module, state: dict) -> tuple[list, list]:
    own = set(model.state_dict())
    return sorted(own - set(state)), sorted(set(state) - own)


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-1 over every state_dict entry's name, dtype, shape and *all* its bytes.

    A full hash rather than a strided sample: any changed weight must invalidate cached
    activations, and SHA-1 runs at >1 GB/s here (ResNet-50's 100 MB in ~0.1 s), which is
    negligible next to a dissection. Computed once per `dissect` call."""
    h = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        t = t.to("cpu").contiguous().reshape(-1)
        if t.numel():
            h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


# -- specs ----------------------------------------------------------------------------

def load_model(spec: str, weights: str | os.PathLike | None = None) -> tuple[nn.Module, str]:
    """Build the model a spec names (see module doc). Returns (model in eval mode, name),
    the name being what results are filed under."""
    if not spec or not isinstance(spec, str):
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}")
    if spec in _BUILTIN:
        model, name = _BUILTIN[spec](), spec
    elif spec.startswith("torchvision:"):
        model, name = _torchvision(spec[len("torchvision:"):]), spec.split(":", 1)[1]
    elif os.path.isfile(spec):
        model, name = _torchscript(spec), Path(spec).stem
    elif ":" in spec:
        model, name = _factory(spec), spec.rsplit(":", 1)[1]
    else:
        raise ValueError(f"model spec {spec!r} is not understood: use one of "
                         f"{', '.join(sorted(_BUILTIN))}, torchvision:NAME, "
                         "package.module:factory or a TorchScript file path")
    if weights is not None:
        load_weights(model, weights)
    return model.eval(), name


def _torchvision(arch: str) -> nn.Module:
    try:
        import torchvision.models as tvm
    except ImportError:
        raise ImportError(f"model spec 'torchvision:{arch}' needs torchvision, which is not "
                          "installed; use 'mobilenet_v2', package.module:factory or a "
                          "TorchScript file instead") from None
    factory = getattr(tvm, arch, None)
    if not callable(factory):
        raise ValueError(f"torchvision.models has no model {arch!r}")
    return factory(weights=None)  # weights come from --weights: nothing is downloaded


def _torchscript(path: str) -> nn.Module:
    try:
        with warnings.catch_warnings():   # deprecated in torch 2.x, still the way to read the file
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
            return torch.jit.load(path, map_location="cpu")
    except Exception as e:
        raise ValueError(f"model file {path!r} is not a TorchScript archive: {e}") from None


def _factory(spec: str) -> nn.Module:
    module_name, attr = spec.rsplit(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model spec {spec!r}: cannot import {module_name!r} ({e})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model spec {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    model = obj if isinstance(obj, nn.Module) else obj() if callable(obj) else None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model spec {spec!r} did not give a torch.nn.Module "
                         f"(got {type(model).__name__})")
    return model
