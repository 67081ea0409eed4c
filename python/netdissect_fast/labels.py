"""The compact label form the tally kernels consume (SPEC §1, §3).

Per image, every pixel carries the *multiset* of labels of all its planes. Each
distinct multiset in an image is a "label set"; a pixel stores the local id of its
set (uint16: an image has at most sh*sw < 65536 distinct sets). Local set 0 of every
image is the empty set. A batch concatenates the images' sets into CSR arrays:

    pixel_sets        uint16 (B, sh, sw)   local set id per pixel
    set_start         int64  (B+1,)        image b owns global sets [set_start[b], set_start[b+1])
    set_label_start   int64  (S+1,)        set s holds set_labels[set_label_start[s]:set_label_start[s+1]]
    set_labels        int32  (...)         label numbers, ascending, duplicates kept
                                           (one entry per plane that carries the label)
    set_pixels        int64  (S,)          pixels of set s in its image
    image_label_start int64  (B+1,)        image-level labels of image b (scene, texture):
    image_labels      int32  (...)         image_labels[image_label_start[b]:image_label_start[b+1]]

Labels that belong to no selected category are dropped when encoding, so the kernel
never sees them. The Broden packed store holds exactly these arrays for the whole
dataset; `LabelBatch.take` slices a batch out of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

_FIELDS = ("pixel_sets", "set_start", "set_label_start", "set_labels", "set_pixels",
           "image_label_start", "image_labels")


@dataclass
class LabelBatch:
    pixel_sets: np.ndarray
    set_start: np.ndarray
    set_label_start: np.ndarray
    set_labels: np.ndarray
    set_pixels: np.ndarray
    image_label_start: np.ndarray
    image_labels: np.ndarray

    @property
    def batch(self) -> int:
        return int(self.pixel_sets.shape[0])

    @property
    def seg_shape(self) -> tuple[int, int]:
        return int(self.pixel_sets.shape[1]), int(self.pixel_sets.shape[2])

    def __len__(self) -> int:
        return self.batch

    # -- construction -------------------------------------------------------
    @staticmethod
    def encode_image(planes: np.ndarray | Sequence[np.ndarray], image_labels: Iterable[int] = (),
                     keep: np.ndarray | None = None, seg_shape: tuple[int, int] | None = None):
        """Encode one image. ``planes``: (P, sh, sw) integer label planes (P may be 0,
        then ``seg_shape`` is required); ``keep``: bool (L,) of labels to keep (others
        become 0). Returns (pixel_sets (sh, sw) uint16, list of int32 arrays per set,
        set_pixels int64, image_labels int32)."""
        if isinstance(planes, np.ndarray) and planes.ndim == 3:
            stack = planes
        else:
            planes = list(planes)
            if planes:
                stack = np.stack([np.asarray(p) for p in planes])
            else:
                if seg_shape is None:
                    raise ValueError("encode_image: seg_shape is required when there are no planes")
                stack = np.zeros((0,) + tuple(seg_shape), np.int64)
        P, sh, sw = stack.shape
        flat = stack.reshape(P, sh * sw).astype(np.int64)
        if keep is not None and P:
            too_big = flat >= len(keep)
            if too_big.any():
                raise ValueError(f"label number {int(flat[too_big].max())} is outside the label "
                                 f"space (0..{len(keep) - 1})")
            flat = np.where(keep[flat], flat, 0)
        if P == 0:
            pixel_sets = np.zeros((sh, sw), np.uint16)
            sets = [np.zeros(0, np.int32)]
            counts = np.array([sh * sw], np.int64)
        else:
            flat = np.sort(flat, axis=0)                      # each pixel's multiset, sorted
            # Prepend an all-zero column so the empty set always exists and is id 0.
            cols = np.concatenate([np.zeros((P, 1), np.int64), flat], axis=1)
            uniq, inverse = np.unique(cols, axis=1, return_inverse=True)
            inverse = inverse.reshape(-1)
            pixel_sets = inverse[1:].astype(np.uint16).reshape(sh, sw)
            counts = np.bincount(inverse[1:], minlength=uniq.shape[1]).astype(np.int64)
            sets = [u[u > 0].astype(np.int32) for u in uniq.T]
        img = np.asarray(sorted(int(x) for x in image_labels), np.int32)
        if keep is not None and img.size:
            if (img >= len(keep)).any() or (img < 0).any():
                raise ValueError(f"image-level label {int(img.max())} is outside the label space "
                                 f"(0..{len(keep) - 1})")
            img = img[keep[img]]
        return pixel_sets, sets, counts, img

    @classmethod
    def from_images(cls, encoded: Sequence[tuple]) -> "LabelBatch":
        """Concatenate the outputs of :meth:`encode_image`."""
        if not encoded:
            raise ValueError("LabelBatch.from_images: no images")
        pixel_sets = np.stack([e[0] for e in encoded])
        set_start = np.zeros(len(encoded) + 1, np.int64)
        set_lists, set_pixels, image_lists = [], [], []
        for b, (_, sets, counts, img) in enumerate(encoded):
            set_start[b + 1] = set_start[b] + len(sets)
            set_lists.extend(sets)
            set_pixels.append(np.asarray(counts, np.int64))
            image_lists.append(np.asarray(img, np.int32))
        lens = np.array([len(s) for s in set_lists], np.int64)
        set_label_start = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        set_labels = (np.concatenate(set_lists).astype(np.int32) if lens.sum()
                      else np.zeros(0, np.int32))
        ilens = np.array([len(s) for s in image_lists], np.int64)
        image_label_start = np.concatenate([[0], np.cumsum(ilens)]).astype(np.int64)
        image_labels = (np.concatenate(image_lists).astype(np.int32) if ilens.sum()
                        else np.zeros(0, np.int32))
        return cls(pixel_sets.astype(np.uint16), set_start, set_label_start, set_labels,
                   np.concatenate(set_pixels), image_label_start, image_labels)

    @classmethod
    def concat(cls, batches: Sequence["LabelBatch"]) -> "LabelBatch":
        if len(batches) == 1:
            return batches[0]
        parts = {f: [] for f in _FIELDS}
        set_off = lab_off = img_off = 0
        for lb in batches:
            parts["pixel_sets"].append(lb.pixel_sets)
            parts["set_start"].append(lb.set_start[:-1] + set_off)
            parts["set_label_start"].append(lb.set_label_start[:-1] + lab_off)
            parts["set_labels"].append(lb.set_labels)
            parts["set_pixels"].append(lb.set_pixels)
            parts["image_label_start"].append(lb.image_label_start[:-1] + img_off)
            parts["image_labels"].append(lb.image_labels)
            set_off += int(lb.set_start[-1])
            lab_off += int(lb.set_label_start[-1])
            img_off += int(lb.image_label_start[-1])
        parts["set_start"].append(np.array([set_off], np.int64))
        parts["set_label_start"].append(np.array([lab_off], np.int64))
        parts["image_label_start"].append(np.array([img_off], np.int64))
        return cls(**{f: np.concatenate(v) for f, v in parts.items()})

    def take(self, indices) -> "LabelBatch":
        """The sub-batch of the given image positions (any order, repeats allowed)."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size == 0:
            raise ValueError("LabelBatch.take: no indices")
        if idx.min() < 0 or idx.max() >= self.batch:
            raise IndexError(f"LabelBatch.take: index out of range 0..{self.batch - 1}")
        run = consecutive_run(idx)
        if run is not None:
            return self._slice(*run)
        s0, s1 = self.set_start[idx], self.set_start[idx + 1]
        set_idx = _ranges(s0, s1)
        l0, l1 = self.set_label_start[set_idx], self.set_label_start[set_idx + 1]
        i0, i1 = self.image_label_start[idx], self.image_label_start[idx + 1]
        return LabelBatch(
            pixel_sets=np.ascontiguousarray(self.pixel_sets[idx]),
            set_start=np.concatenate([[0], np.cumsum(s1 - s0)]).astype(np.int64),
            set_label_start=np.concatenate([[0], np.cumsum(l1 - l0)]).astype(np.int64),
            set_labels=self.set_labels[_ranges(l0, l1)].astype(np.int32, copy=False),
            set_pixels=self.set_pixels[set_idx],
            image_label_start=np.concatenate([[0], np.cumsum(i1 - i0)]).astype(np.int64),
            image_labels=self.image_labels[_ranges(i0, i1)].astype(np.int32, copy=False),
        )

    def _slice(self, a: int, b: int) -> "LabelBatch":
        """Images a..b-1: every array is a slice (the common case of consecutive batches)."""
        s0, s1 = int(self.set_start[a]), int(self.set_start[b])
        l0, l1 = int(self.set_label_start[s0]), int(self.set_label_start[s1])
        i0, i1 = int(self.image_label_start[a]), int(self.image_label_start[b])
        return LabelBatch(
            pixel_sets=np.ascontiguousarray(self.pixel_sets[a:b]),
            set_start=self.set_start[a:b + 1] - s0,
            set_label_start=self.set_label_start[s0:s1 + 1] - l0,
            set_labels=self.set_labels[l0:l1].astype(np.int32, copy=False),
            set_pixels=self.set_pixels[s0:s1],
            image_label_start=self.image_label_start[a:b + 1] - i0,
            image_labels=self.image_labels[i0:i1].astype(np.int32, copy=False),
        )

    def validate(self, num_labels: int) -> None:
        """Check the invariants the kernels rely on; raise ValueError naming the field."""
        B = self.batch
        if self.pixel_sets.dtype != np.uint16 or self.pixel_sets.ndim != 3:
            raise ValueError("labels.pixel_sets must be a uint16 (B, sh, sw) array")
        for name in ("set_start", "set_label_start", "image_label_start"):
            a = getattr(self, name)
            if a.dtype != np.int64 or a.ndim != 1 or a.size == 0 or a[0] != 0 or (np.diff(a) < 0).any():
                raise ValueError(f"labels.{name} must be a non-decreasing int64 array starting at 0")
        if len(self.set_start) != B + 1 or len(self.image_label_start) != B + 1:
            raise ValueError("labels.set_start and labels.image_label_start must have B+1 entries")
        S = int(self.set_start[-1])
        if len(self.set_label_start) != S + 1 or len(self.set_pixels) != S:
            raise ValueError("labels.set_label_start / set_pixels do not match set_start")
        if int(self.set_label_start[-1]) != len(self.set_labels):
            raise ValueError("labels.set_labels length does not match set_label_start")
        if int(self.image_label_start[-1]) != len(self.image_labels):
            raise ValueError("labels.image_labels length does not match image_label_start")
        nsets = np.diff(self.set_start)
        if B and (nsets < 1).any():
            raise ValueError("labels: every image needs at least its empty set 0")
        if B:
            per_image_max = self.pixel_sets.reshape(B, -1).max(axis=1).astype(np.int64)
            bad = np.nonzero(per_image_max >= nsets)[0]
            if bad.size:
                raise ValueError(f"labels.pixel_sets: image {int(bad[0])} uses set id "
                                 f"{int(per_image_max[bad[0]])} but has only {int(nsets[bad[0]])} sets")
        for name in ("set_labels", "image_labels"):
            a = getattr(self, name)
            if a.dtype != np.int32:
                raise ValueError(f"labels.{name} must be int32")
            if a.size and (a.min() < 1 or a.max() >= num_labels):
                bad = a[(a < 1) | (a >= num_labels)][0]
                raise ValueError(f"labels.{name}: label number {int(bad)} is outside the label "
                                 f"space 1..{num_labels - 1}")


def consecutive_run(idx: np.ndarray) -> tuple[int, int] | None:
    """(a, b) when ``idx`` is a, a+1, ..., b-1 (two or more), so a batch can be sliced
    instead of gathered; None otherwise."""
    if idx.size > 1 and idx[-1] - idx[0] == idx.size - 1 and (np.diff(idx) == 1).all():
        return int(idx[0]), int(idx[-1]) + 1
    return None


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) for each pair, vectorised."""
    lens = (ends - starts).astype(np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offs = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return np.arange(total, dtype=np.int64) + offs
