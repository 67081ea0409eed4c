"""TopImages: per unit, the N images with the highest maximum activation.

Streaming and exact: after any sequence of `update` and `merge` calls the kept images
are the same as sorting every (image, maximum) pair seen, by value descending and then
by image index ascending, and taking the first N. The kept images' activation maps are
stored too, so the report can draw each unit's mask on its top images later.

Ordering trick: each candidate becomes one int64 key, (value rank << 32) | index, whose
ascending order is the wanted order, so selection is one argpartition per row instead
of a two-key lexsort. Only rows where some candidate can enter are touched, so late in
a pass (when few images beat the current N-th) an update costs almost nothing.
"""
from __future__ import annotations

import numpy as np

_EMPTY_INDEX_KEY = np.int64(0xFFFFFFFF)    # empty slots sort after every real image
_LOSING_KEY = np.iinfo(np.int64).max          # candidates that must not be picked
_MAX_IMAGE_INDEX = 0xFFFFFFFE


def _keys(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """int64 keys whose ascending order is (value descending, index ascending).

    The float32 bits, with the non-sign bits flipped for negatives, order like the
    floats as signed int32; inverting that reverses it. Adding 0 turns -0.0 into 0.0
    so that equal values tie on the index. Callers map NaN to -inf first.
    """
    bits = (np.asarray(values, dtype=np.float32) + np.float32(0)).view(np.int32)
    descending = ~(bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF)))
    index_key = np.where(indices < 0, _EMPTY_INDEX_KEY, indices)
    return (descending.astype(np.int64) << 32) | index_key


class TopImages:
    """Exact streaming top-N images per unit (see module docstring).

    Arrays, ordered best first: ``indices (K, n) int64`` (-1 = empty slot),
    ``values (K, n) float32`` (-inf in empty slots) and ``maps (K, n, h, w) float32``
    (zeros in empty slots; None when ``map_shape`` is None).
    """

    def __init__(self, units: int, n: int = 10, map_shape: tuple[int, int] | None = None):
        units, n = int(units), int(n)
        if units < 1:
            raise ValueError(f"TopImages: units must be >= 1, got {units}")
        if n < 1:
            raise ValueError(f"TopImages: n must be >= 1, got {n}")
        self.units, self.n = units, n
        self.map_shape = None if map_shape is None else tuple(int(s) for s in map_shape)
        self.indices = np.full((units, n), -1, np.int64)
        self.values = np.full((units, n), -np.inf, np.float32)
        self.maps = (None if self.map_shape is None
                     else np.zeros((units, n) + self.map_shape, np.float32))

    # -- streaming ------------------------------------------------------------
    def update(self, maxima, image_indices, maps=None) -> None:
        """Offer one batch: ``maxima (B, K)`` per-image unit maxima, ``image_indices
        (B,)`` dataset rows, ``maps (B, K, h, w)`` the activation maps (required when
        the object stores maps). An image should be offered once."""
        maxima = np.asarray(maxima, dtype=np.float32)
        image_indices = np.asarray(image_indices).astype(np.int64, copy=False)
        if maxima.ndim != 2 or maxima.shape[1] != self.units:
            raise ValueError(f"TopImages.update: maxima must be (B, {self.units}), got {maxima.shape}")
        B = maxima.shape[0]
        if image_indices.shape != (B,):
            raise ValueError(f"TopImages.update: image_indices must be ({B},), got {image_indices.shape}")
        if B and (image_indices.min() < 0 or image_indices.max() > _MAX_IMAGE_INDEX):
            raise ValueError("TopImages.update: image_indices must lie in [0, 2**32 - 2]")
        if self.maps is not None:
            if maps is None:
                raise ValueError("TopImages.update: maps is required (map_shape was given)")
            maps = np.asarray(maps)
            if maps.shape != (B, self.units) + self.map_shape:
                raise ValueError(f"TopImages.update: maps must be {(B, self.units) + self.map_shape}, "
                                 f"got {maps.shape}")
        if B == 0:
            return
        # NaN ranks as -inf (fmax drops NaN), so a NaN maximum never outranks a real one.
        maxima = np.fmax(maxima, np.float32(-np.inf))
        # A candidate can enter a row only if it is at least as good as the row's n-th
        # (ties may still win on the index); empty slots hold -inf, so they always can.
        rows = np.flatnonzero((maxima >= self.values[:, self.n - 1]).any(axis=0))
        if rows.size == 0:
            return
        cand_values = np.ascontiguousarray(maxima[:, rows].T)   # (R, B)
        cand_indices = np.broadcast_to(image_indices, cand_values.shape)
        gather = None
        if self.maps is not None:
            def gather(r, col):                                  # candidate -> its map
                return maps[col, r]
        self._select(rows, cand_values, cand_indices, gather)

    def merge(self, other: "TopImages") -> "TopImages":
        """Fold in another TopImages over disjoint images; same result as one pass."""
        if not isinstance(other, TopImages):
            raise TypeError(f"TopImages.merge: expected TopImages, got {type(other).__name__}")
        if other.units != self.units or other.map_shape != self.map_shape:
            raise ValueError(f"TopImages.merge: shapes differ (units {self.units} vs {other.units}, "
                             f"map_shape {self.map_shape} vs {other.map_shape})")
        valid = other.indices >= 0
        rows = np.flatnonzero((valid & (other.values >= self.values[:, self.n - 1:])).any(axis=1))
        if rows.size == 0:
            return self
        cand_indices = np.where(valid[rows], other.indices[rows], -1)
        gather = None
        if self.maps is not None:
            def gather(r, col):
                return other.maps[r, col]
        self._select(rows, other.values[rows], cand_indices, gather)
        return self

    def _select(self, rows, cand_values, cand_indices, gather_maps) -> None:
        """For each row in ``rows``, keep the best n of its current entries and its
        candidates (``cand_*`` are (R, M), index -1 = no candidate)."""
        n = self.n
        cand_keys = _keys(cand_values, cand_indices)
        cand_keys[cand_indices < 0] = _LOSING_KEY
        keys = np.concatenate([_keys(self.values[rows], self.indices[rows]), cand_keys], axis=1)
        pick = np.argpartition(keys, n - 1, axis=1)[:, :n]
        pick = np.take_along_axis(pick, np.argsort(np.take_along_axis(keys, pick, 1), axis=1), 1)

        from_old = pick < n
        old_col = np.where(from_old, pick, 0)
        cand_col = np.where(from_old, 0, pick - n)
        r = rows[:, None]
        local = np.arange(rows.size)[:, None]
        self.values[rows] = np.where(from_old, self.values[r, old_col], cand_values[local, cand_col])
        self.indices[rows] = np.where(from_old, self.indices[r, old_col], cand_indices[local, cand_col])
        if gather_maps is not None:
            new_maps = self.maps[r, old_col]                      # (R, n, h, w) copy
            taken = ~from_old
            if taken.any():
                new_maps[taken] = gather_maps(np.broadcast_to(r, pick.shape)[taken], cand_col[taken])
            self.maps[rows] = new_maps

    # -- persistence ------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain numpy arrays; `from_state` rebuilds an identical object."""
        state = {"indices": self.indices.copy(), "values": self.values.copy(),
                 "n": np.int64(self.n)}
        if self.maps is not None:
            state["maps"] = self.maps.copy()
        return state

    @classmethod
    def from_state(cls, state: dict) -> "TopImages":
        indices = np.asarray(state["indices"], np.int64)
        values = np.asarray(state["values"], np.float32)
        if indices.ndim != 2 or values.shape != indices.shape:
            raise ValueError(f"TopImages.from_state: indices {indices.shape} and values "
                             f"{values.shape} must be equal (K, n) shapes")
        maps = state.get("maps")
        map_shape = None if maps is None else tuple(np.shape(maps)[2:])
        top = cls(indices.shape[0], indices.shape[1], map_shape)
        top.indices[...] = indices
        top.values[...] = values
        if maps is not None:
            if np.shape(maps)[:2] != indices.shape:
                raise ValueError(f"TopImages.from_state: maps {np.shape(maps)} do not match "
                                 f"indices {indices.shape}")
            top.maps[...] = maps
        return top
