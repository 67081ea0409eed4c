"""Which compiled backends exist, which device to run on, and how arrays cross
into the kernels (address + shape + strides; the extension never links torch)."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

# Element type codes understood by the kernels (csrc/include/ndf/common.h).
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}

_modules: dict[str, Any] = {}
_errors: dict[str, str] = {}


def _load(name: str):
    if name not in _modules and name not in _errors:
        try:
            _modules[name] = importlib.import_module(f"netdissect_fast.{name}")
        except ImportError as e:  # not compiled, or broken
            _errors[name] = str(e)
    return _modules.get(name)


class BackendReport(dict):
    """``ndf.backends()``: a dict per backend with ``compiled``, ``usable`` and
    ``detail``; printing it gives one line per backend."""

    def __str__(self) -> str:
        lines = []
        for name, info in self.items():
            state = "usable" if info["usable"] else ("compiled, not usable" if info["compiled"] else "not compiled")
            lines.append(f"{name:5s} {state}: {info['detail']}")
        return "\n".join(lines)


def backends() -> BackendReport:
    """Which backends are compiled and usable, and why not. Never raises."""
    report = BackendReport()
    cpu = _load("_C")
    if cpu is not None:
        report["cpu"] = dict(compiled=True, usable=True,
                             detail=f"C++17/OpenMP, SIMD {cpu.isa()}, {default_threads()} threads")
    else:
        report["cpu"] = dict(compiled=False, usable=False,
                             detail=f"extension _C failed to import: {_errors.get('_C')}")
    cuda = _load("_cuda")
    if cuda is None:
        report["cuda"] = dict(compiled=False, usable=False,
                              detail="built without CUDA (no nvcc at build time)")
    else:
        count, why = cuda.device_count()
        archs = cuda.compiled_architectures()
        span = f"sm_{archs[0]}–sm_{archs[-1]}" if archs else "?"
        if count > 0:
            report["cuda"] = dict(compiled=True, usable=True,
                                  detail=f"compiled for {span}; {count} device(s): {cuda.device_name(0)}")
        else:
            report["cuda"] = dict(compiled=True, usable=False, detail=f"compiled for {span}; {why}")
    return report


def cuda_usable() -> bool:
    cuda = _load("_cuda")
    return cuda is not None and cuda.device_count()[0] > 0


def resolve_device(device: str | None) -> str:
    """'auto' -> 'cuda' when a CUDA device exists, else 'cpu'."""
    if device is None or device == "auto":
        return "cuda" if cuda_usable() else "cpu"
    dev = str(device)
    if dev == "cpu":
        if _load("_C") is None:
            raise RuntimeError(f"the CPU backend failed to import: {_errors.get('_C')}")
        return "cpu"
    if dev == "cuda" or dev.startswith("cuda:"):
        if dev not in ("cuda", "cuda:0"):
            raise ValueError(f"device={device!r}: only 'cuda' (the current device) is supported")
        if not cuda_usable():
            raise RuntimeError(f"device='cuda' requested but CUDA is not usable: {backends()['cuda']['detail']}")
        return "cuda"
    if dev == "cuda-emulated":  # test-only: the CUDA sources compiled for the CPU
        kernels(dev)
        return dev
    raise ValueError(f"device={device!r}: expected 'auto', 'cpu' or 'cuda'")


def kernels(device: str):
    """The extension module implementing `device` ('cpu', 'cuda', or the test-only
    'cuda-emulated', which runs the CUDA sources on the CPU)."""
    name = {"cpu": "_C", "cuda": "_cuda", "cuda-emulated": "_cuda_emu"}[device]
    mod = _load(name)
    if mod is None:
        raise RuntimeError(f"backend {device!r} is not available: {_errors.get(name)}")
    return mod


def on_device(batch, device: str, name: str = "batch") -> "ArrayView":
    """The view of `batch` where backend `device` reads it: CUDA tensors for 'cuda'
    (numpy input is copied over), host memory for 'cpu' and 'cuda-emulated'."""
    if device == "cuda":
        if not is_torch_tensor(batch) or not batch.is_cuda:
            import torch
            batch = torch.as_tensor(np_or_tensor_cpu(batch), device="cuda")
        return activation_view(batch, name)
    v = activation_view(batch, name)
    if v.device != "cpu":
        raise ValueError(f"{name} is a CUDA tensor but this runs on the {device} backend; "
                         "use device='cuda' or move it with .cpu()")
    return v


def np_or_tensor_cpu(x):
    return x if is_torch_tensor(x) else np.asarray(x)


def current_stream(device: str) -> int:
    if device != "cuda":
        return 0
    import torch
    return int(torch.cuda.current_stream().cuda_stream)


def default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------
# Arrays -> (address, dtype code, shape, element strides)

@dataclass
class ArrayView:
    ptr: int
    dtype: int
    shape: tuple
    strides: tuple  # in elements
    device: str     # "cpu" or "cuda"
    owner: Any      # keeps the memory alive


def is_torch_tensor(x) -> bool:
    t = type(x)
    return t.__module__.startswith("torch") and hasattr(x, "data_ptr")


def _dtype_name(dt) -> str:
    s = str(dt)
    return s.replace("torch.", "")


def activation_view(x, name: str = "activations") -> ArrayView:
    """View of a float32/float16/bfloat16 array (numpy or torch). Arrays whose
    innermost dimension is strided are copied to contiguous memory."""
    if is_torch_tensor(x):
        dt = _dtype_name(x.dtype)
        if dt not in DTYPE_CODES:
            raise TypeError(f"{name}: dtype {dt} is not supported; use float32, float16 or bfloat16")
        dev = "cuda" if x.is_cuda else "cpu"
        if x.device.type not in ("cpu", "cuda"):
            raise TypeError(f"{name}: tensors on {x.device} are not supported")
        if not _inner_contiguous(tuple(x.shape), x.stride()):
            x = x.contiguous()
        return ArrayView(x.data_ptr(), DTYPE_CODES[dt], tuple(x.shape), tuple(x.stride()), dev, x)
    if isinstance(x, np.ndarray):
        dt = x.dtype.name
        if dt not in DTYPE_CODES:
            raise TypeError(f"{name}: dtype {x.dtype} is not supported; use float32, float16 or bfloat16"
                            + (" (convert float64 explicitly: it cannot be scored without rounding)"
                               if dt == "float64" else ""))
        if x.dtype.byteorder == ">":
            raise TypeError(f"{name}: big-endian arrays are not supported")
        item = x.dtype.itemsize
        if any(s % item for s in x.strides) or not _inner_contiguous(x.shape, tuple(s // item for s in x.strides)):
            x = np.ascontiguousarray(x)
        return ArrayView(x.ctypes.data, DTYPE_CODES[dt], x.shape, tuple(s // item for s in x.strides), "cpu", x)
    raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")


def _inner_contiguous(shape, strides) -> bool:
    """True when the trailing (h, w) block of a (B, K, h, w) array is contiguous
    (the kernels read each map as one run); always true for 2-D input."""
    if len(shape) < 4:
        return len(shape) < 2 or strides[-1] == 1 or shape[-1] == 1
    h, w = shape[-2], shape[-1]
    return (w == 1 or strides[-1] == 1) and (h == 1 or strides[-2] == w)

