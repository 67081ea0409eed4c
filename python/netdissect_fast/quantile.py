"""Per-unit thresholds T_k = quantile_q of all of unit k's activations (SPEC §1.1),
computed in one streaming pass.

Only the largest m = n - floor((n-1)·q) values of a unit decide its q-quantile
(numpy's "linear" method reads the order statistics at ascending ranks
floor((n-1)q) and the next one). Each unit therefore keeps a tail buffer of its
largest values; a running lower bound lets a SIMD compare reject almost every
value. With ``total`` (values per unit) given, the buffer holds exactly m values
and the result equals ``numpy.quantile(values.astype(float64), q)`` bit for bit.
Without ``total`` the buffer size comes from ``memory_budget``; the result is
still exact whenever the final m fits, otherwise the smallest kept value is
returned and ``rank_error_bound`` says how many ranks (as a fraction of n) it
can be off.
"""
from __future__ import annotations

import json
import math
import struct

import numpy as np

from . import _backend

try:  # numpy's own interpolation, so results match it to the last bit
    from numpy.lib._function_base_impl import _lerp as _np_lerp
except ImportError:  # pragma: no cover - older numpy
    try:
        from numpy.lib.function_base import _lerp as _np_lerp
    except ImportError:
        _np_lerp = None

_MAGIC = b"NDFQ1\n"


def _lerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    if _np_lerp is not None:
        return _np_lerp(a, b, np.float64(t))
    diff = b - a
    out = a + diff * t
    return np.where(t >= 0.5, b - diff * (1 - t), out)


def _linear_ranks(n: int, q: float):
    """Ascending ranks (prev, next) and weight gamma of numpy's linear method."""
    virtual = np.float64(n - 1) * np.float64(q)
    prev = math.floor(virtual)
    nxt = prev + 1
    if virtual >= n - 1:
        prev = nxt = n - 1
        gamma = virtual - np.float64(-1)  # numpy indexes -1 here; a == b makes it moot
    elif virtual < 0:
        prev = nxt = 0
        gamma = virtual
    else:
        gamma = virtual - np.float64(prev)
    return prev, nxt, float(gamma)


def tail_size(n: int, q: float) -> int:
    """How many of the largest values decide the q-quantile of n values."""
    if n <= 0:
        return 0
    prev, _, _ = _linear_ranks(n, q)
    return n - prev


class QuantileSketch:
    """Streaming per-unit quantiles (SPEC §7).

    ``units``: K. ``q``: the threshold level. ``total``: values per unit the
    caller will feed (N·h·w); for shards of one dataset pass the *global* total to
    every shard so that merging stays exact. ``memory_budget``: bytes for the tail
    buffers (default 512 MiB: exact for K=2208 units over the full 63,305-image
    Broden at 7x7); a tail that does not fit makes the result approximate, with
    ``rank_error_bound`` saying by how much."""

    def __init__(self, units: int, q: float = 0.995, total: int | None = None, device: str = "auto",
                 memory_budget: int = 512 << 20, threads: int | None = None, min_level: float | None = None):
        if not isinstance(units, (int, np.integer)) or units <= 0:
            raise ValueError(f"units must be a positive integer, got {units!r}")
        if not (0.0 < float(q) < 1.0):
            raise ValueError(f"q must be in (0, 1), got {q!r}")
        if total is not None and (not isinstance(total, (int, np.integer)) or total <= 0):
            raise ValueError(f"total must be a positive integer (values per unit), got {total!r}")
        self.units = int(units)
        self.q = float(q)
        self.total = None if total is None else int(total)
        self.min_level = float(q if min_level is None else min(min_level, q))
        self.device = _backend.resolve_device(device)
        self.threads = threads or _backend.default_threads()
        # A unit's buffer holds about 2 * keep floats (keep + slack): 8 bytes per kept value.
        budget_keep = max(int(memory_budget // (8 * self.units)), 16)
        if self.total is not None:
            keep = min(tail_size(self.total, self.min_level), budget_keep)
        else:
            keep = budget_keep
        self.keep = keep
        self._impl = _backend.kernels(self.device).TailQuantile(self.units, keep)
        self.count = 0
        self._poisoned = None

    # -- feeding -----------------------------------------------------------
    def update(self, batch, maxima_out: np.ndarray | None = None) -> "QuantileSketch":
        """Add a (B, K, h, w) or (B, K) batch (numpy or torch, float32/16/bfloat16).
        ``maxima_out``: optional float32 (B, K) array receiving each map's maximum."""
        if self._poisoned:
            raise RuntimeError(f"QuantileSketch is unusable after a rejected batch ({self._poisoned})")
        v = _backend.on_device(batch, self.device)
        if len(v.shape) not in (2, 4):
            raise ValueError(f"batch must have shape (B, K, h, w) or (B, K), got {tuple(v.shape)}")
        B, K = v.shape[0], v.shape[1]
        if K != self.units:
            raise ValueError(f"batch has {K} units, the sketch was made for {self.units}")
        if B == 0:
            return self
        map_size = int(np.prod(v.shape[2:])) if len(v.shape) == 4 else 1
        if map_size == 0:
            raise ValueError(f"batch has an empty activation map: shape {tuple(v.shape)}")
        if maxima_out is not None and (not isinstance(maxima_out, np.ndarray) or maxima_out.dtype != np.float32
                                       or maxima_out.shape != (B, K) or not maxima_out.flags.c_contiguous):
            raise ValueError(f"maxima_out must be a C-contiguous float32 array of shape {(B, K)}")
        dev_maxima = None
        mptr = 0
        if maxima_out is not None:
            if self.device == "cuda":
                import torch
                dev_maxima = torch.empty((B, K), dtype=torch.float32, device="cuda")
                mptr = dev_maxima.data_ptr()
            else:
                mptr = maxima_out.ctypes.data
        last = self.threads if self.device == "cpu" else _backend.current_stream(self.device)
        unit, b, pos = self._impl.update(v.ptr, v.dtype, B, K, map_size, v.strides[0], v.strides[1], mptr, last)
        if dev_maxima is not None:
            maxima_out[...] = dev_maxima.cpu().numpy()
        if unit >= 0:
            self._poisoned = f"non-finite value in unit {unit}, batch position {b}, map element {pos}"
            raise ValueError(f"batch contains NaN or Inf: unit {unit}, batch position {b}, "
                             f"map element {pos}")
        self.count += B * map_size
        return self

    def merge(self, other: "QuantileSketch") -> "QuantileSketch":
        """Fold another sketch (a shard of the same units) into this one."""
        if not isinstance(other, QuantileSketch):
            raise TypeError("merge expects a QuantileSketch")
        if other.units != self.units:
            raise ValueError(f"cannot merge sketches of {other.units} and {self.units} units")
        if other._poisoned or self._poisoned:
            raise RuntimeError("cannot merge a sketch that rejected a batch")
        for k in range(self.units):
            tail = np.ascontiguousarray(other._tail(k), np.float32)
            if tail.size:
                self._impl.insert(k, tail.ctypes.data, tail.size)
        self.count += other.count
        return self

    def _tail(self, k: int) -> np.ndarray:
        return self._impl.tail(k)

    # -- reading -------------------------------------------------------------
    def _order_statistic(self, rank_desc: int) -> np.ndarray:
        out = np.empty(self.units, np.float32)
        self._impl.order_statistic(int(rank_desc), out.ctypes.data, self.threads)
        return out

    def quantiles(self, levels) -> np.ndarray:
        """(len(levels), K) float64 quantiles; each level must be >= min_level
        (the tail only holds the top of the distribution)."""
        if self.count == 0:
            raise ValueError("no values have been added")
        levels = np.atleast_1d(np.asarray(levels, np.float64))
        out = np.empty((len(levels), self.units), np.float64)
        n = self.count
        for i, lv in enumerate(levels):
            if not (0.0 <= lv <= 1.0):
                raise ValueError(f"quantile level {lv} outside [0, 1]")
            if lv < self.min_level - 1e-15:
                raise ValueError(f"level {lv} is below min_level={self.min_level}: the sketch keeps only "
                                 f"the top of each unit's values (make it with min_level={lv})")
            prev, nxt, gamma = _linear_ranks(n, float(lv))
            rp, rn = n - 1 - prev, n - 1 - nxt
            if rp >= self.keep:  # the tail is too short: the bounded-error answer
                rp = rn = self.keep - 1
            a = self._order_statistic(rp).astype(np.float64)
            b = a if rn == rp else self._order_statistic(rn).astype(np.float64)
            out[i] = _lerp(a, b, gamma)
        return out

    def thresholds(self) -> np.ndarray:
        """T_k for every unit: float64 (K,)."""
        return self.quantiles([self.q])[0]

    @property
    def exact(self) -> bool:
        return tail_size(self.count, self.min_level) <= self.keep

    @property
    def rank_error_bound(self) -> float:
        """Largest possible |rank(T) - rank(true quantile)| / n; 0 when exact."""
        need = tail_size(self.count, self.min_level)
        return 0.0 if need <= self.keep else (need - self.keep) / self.count

    # -- serialization -------------------------------------------------------
    def to_bytes(self) -> bytes:
        header = json.dumps(dict(units=self.units, q=self.q, total=self.total, keep=self.keep,
                                 count=self.count, min_level=self.min_level)).encode()
        tails = [self._tail(k) for k in range(self.units)]
        counts = np.array([t.size for t in tails], np.int64)
        body = np.concatenate(tails).astype("<f4") if counts.sum() else np.zeros(0, "<f4")
        return b"".join([_MAGIC, struct.pack("<Q", len(header)), header, counts.astype("<i8").tobytes(),
                         body.tobytes()])

    @classmethod
    def from_bytes(cls, data: bytes, device: str = "auto", threads: int | None = None) -> "QuantileSketch":
        if not data.startswith(_MAGIC):
            raise ValueError("not a serialized QuantileSketch")
        off = len(_MAGIC)
        (hlen,) = struct.unpack_from("<Q", data, off)
        off += 8
        h = json.loads(data[off:off + hlen])
        off += hlen
        # A budget of exactly the saved tail size restores the same `keep`, so the
        # buffers are allocated once, at their saved size.
        obj = cls(h["units"], h["q"], total=h["total"], device=device, threads=threads,
                  min_level=h["min_level"], memory_budget=8 * h["keep"] * h["units"])
        if obj.keep != h["keep"]:
            raise ValueError(f"serialized QuantileSketch keeps {h['keep']} values per unit, "
                             f"restored {obj.keep}")
        counts = np.frombuffer(data, "<i8", h["units"], off)
        off += 8 * h["units"]
        values = np.frombuffer(data, "<f4", int(counts.sum()), off).astype(np.float32)
        starts = np.concatenate([[0], np.cumsum(counts)])
        for k in range(obj.units):
            seg = np.ascontiguousarray(values[starts[k]:starts[k + 1]])
            if seg.size:
                obj._impl.insert(k, seg.ctypes.data, seg.size)
        obj.count = int(h["count"])
        return obj

    def __repr__(self) -> str:
        return (f"QuantileSketch(units={self.units}, q={self.q}, count={self.count}, keep={self.keep}, "
                f"device={self.device!r}, exact={self.exact})")
