"""Broden reader and validation (SPEC §3, §4; contract in docs/ARCHITECTURE.md).

    ds = Broden("broden1_224", categories=["object", "part"])
    ds.label_batch(range(64))        # LabelBatch from the packed store (built on first use)
    ds.planes(0), ds.image_labels(0), ds.image(0)
    ds.validate()                    # reads every file, prints a summary

Problems in the data (a malformed CSV row, a missing or unreadable file, a PNG of the
wrong size, a label number not in label.csv, an unknown category) raise a `BrodenError`
naming the file and row. With ``on_error="warn"`` each one is a `BrodenWarning` and the
offending row (CSV problems) or label plane (PNG problems) is skipped; `problems` keeps
the list and `validate()` reports it.
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
import json
import multiprocessing
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from .labels import LabelBatch

MAX_CATEGORIES = 32                     # the per-image category mask is a uint32
INDEX_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")


class BrodenError(ValueError):
    """A problem with a Broden dataset on disk; the message names the file (and row)."""


class BrodenWarning(UserWarning):
    """A skipped problem (``on_error="warn"``)."""


@dataclass(frozen=True)
class _Row:
    """One kept index.csv row: PNG planes and image-level labels of selected categories."""
    line: int                                   # line number in index.csv (header = 1)
    image: str                                  # relative to images/
    planes: tuple[tuple[int, str], ...]         # (category index, PNG path relative to images/)
    labels: tuple[tuple[int, int], ...]         # (category index, label number)


@dataclass
class ValidationReport:
    path: str
    images: int
    planes: int
    image_labels: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = (f"Broden {self.path}: {self.images} images, {self.planes} label planes, "
                f"{self.image_labels} image-level labels: ")
        if self.ok:
            return head + "OK"
        shown = "\n  ".join(self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        return head + f"{len(self.problems)} problem(s) skipped\n  {shown}{more}"


class Broden:
    """A Broden dataset directory (SPEC §4): rows = index.csv rows with data in a
    selected category, in index order.

    ``store``: "auto" (packed label store in the default cache location, built on
    first use), a path for the store file, or None (decode the PNGs on every call)."""

    def __init__(self, path, categories: Sequence[str] | None = None, store="auto",
                 on_error: str = "raise"):
        if on_error not in ("raise", "warn"):
            raise ValueError(f"Broden: on_error must be 'raise' or 'warn' (got {on_error!r})")
        self.path = Path(path).resolve()
        if not self.path.is_dir():
            raise BrodenError(f"Broden: {self.path} is not a directory")
        self.on_error = on_error
        self.problems: list[str] = []
        self._reported: set[str] = set()
        self._store_arg = store
        self._store = None
        self._listing = None
        self._files: dict[str, list[int]] = {}

        self.all_categories = [r["name"] for _, r in self._csv("category.csv", ("name",))]
        if categories is None:
            selected = list(self.all_categories)
        else:
            categories = [categories] if isinstance(categories, str) else list(categories)
            for c in categories:
                if c not in self.all_categories:
                    raise ValueError(f"Broden: unknown category {c!r} (category.csv has "
                                     f"{', '.join(self.all_categories)})")
            selected = [c for c in self.all_categories if c in categories]
        if not selected:
            raise ValueError("Broden: no category selected")
        if len(selected) > MAX_CATEGORIES:
            raise ValueError(f"Broden: at most {MAX_CATEGORIES} categories can be selected")
        self.categories: list[str] = selected
        self._read_labels()
        self._read_index()

    # -- CSV parsing -------------------------------------------------------------
    def _problem(self, message: str) -> None:
        if self.on_error == "raise":
            raise BrodenError(message)
        if message in self._reported:         # the same plane read again: already reported
            return
        self._reported.add(message)
        self.problems.append(message)
        warnings.warn(message, BrodenWarning, stacklevel=3)

    def _csv(self, name: str, required: Sequence[str]) -> Iterable[tuple[int, dict]]:
        """(line number, row dict) of a CSV file; rows with the wrong number of fields
        are problems."""
        path = self.path / name
        try:
            st = path.stat()                  # what fingerprint() describes: the file as read
            self._files[name] = [st.st_size, st.st_mtime_ns]
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BrodenError(f"Broden: cannot read {path}: {e}") from None
        lines = text.splitlines()
        if not lines:
            raise BrodenError(f"Broden: {path} is empty")
        header = next(csv.reader(lines[:1]))
        missing = [c for c in required if c not in header]
        if missing:
            raise BrodenError(f"Broden: {path}: header lacks column(s) {', '.join(missing)}")
        rows = []
        for line_no, fields in enumerate(csv.reader(lines[1:]), start=2):
            if not fields:
                continue
            if len(fields) != len(header):
                self._problem(f"{path} row {line_no}: malformed ({len(fields)} fields, header has "
                              f"{len(header)})")
                continue
            rows.append((line_no, dict(zip(header, fields))))
        return rows

    def _read_labels(self) -> None:
        """label.csv → names and known numbers; c_<cat>.csv → primary categories."""
        path = self.path / "label.csv"
        names: dict[int, str] = {}
        for line, r in self._csv("label.csv", ("number", "name", "category")):
            try:
                number = int(r["number"])
                if number == 0:               # "unlabelled", if a file lists it
                    continue
                if number < 0:
                    raise ValueError
                cats = [item.split("(")[0].strip() for item in r["category"].split(";") if item.strip()]
            except ValueError:
                self._problem(f"{path} row {line}: malformed label number {r['number']!r}")
                continue
            unknown = [c for c in cats if c not in self.all_categories]
            if unknown:
                self._problem(f"{path} row {line}: unknown category {unknown[0]!r} (not in category.csv)")
                continue
            if number in names:
                self._problem(f"{path} row {line}: label number {number} is listed twice")
                continue
            names[number] = r["name"]
        if not names:
            raise BrodenError(f"Broden: {path} lists no labels")
        L = max(names) + 1
        self.num_labels = L
        self.label_names = ["-"] + [names.get(n, "") for n in range(1, L)]
        self.known_labels = np.zeros(L, bool)
        self.known_labels[list(names)] = True

        # Primary category: the selected category where the label covers the most area;
        # ties go to the category that comes later in category.csv (NetDissect-Lite).
        best = np.full(L, -np.inf)
        primary = np.full(L, -1, np.int16)
        for ci, cat in enumerate(self.categories):
            cpath = self.path / f"c_{cat}.csv"
            for line, r in self._csv(f"c_{cat}.csv", ("number", "coverage")):
                try:
                    number, coverage = int(r["number"]), float(r["coverage"])
                except ValueError:
                    self._problem(f"{cpath} row {line}: malformed number/coverage")
                    continue
                if number == 0:
                    continue
                if not (0 < number < L and self.known_labels[number]):
                    self._problem(f"{cpath} row {line}: label number {number} is not in label.csv")
                    continue
                if coverage >= best[number]:
                    best[number], primary[number] = coverage, ci
        self.primary_category = primary
        self.label_keep = primary >= 0

    def _read_index(self) -> None:
        path = self.path / "index.csv"
        rows: list[_Row] = []
        shapes: list[tuple[int, int, int, int]] = []
        for line, r in self._csv("index.csv", INDEX_COLUMNS + tuple(self.categories)):
            where = f"{path} row {line}"
            try:
                shape = tuple(int(r[c]) for c in ("ih", "iw", "sh", "sw"))
            except ValueError:
                self._problem(f"{where}: malformed ih/iw/sh/sw")
                continue
            planes, labels, bad = [], [], None
            for ci, cat in enumerate(self.categories):
                for item in (s.strip() for s in r[cat].split(";")):
                    if not item:
                        continue
                    if item.isdigit():
                        n = int(item)
                        if not (0 < n < self.num_labels and self.known_labels[n]):
                            bad = f"{where}: label {n} (category {cat}) is not in label.csv"
                        labels.append((ci, n))
                    else:
                        planes.append((ci, item))
            if bad:
                self._problem(bad)
                continue
            if planes or labels:
                rows.append(_Row(line, r["image"], tuple(planes), tuple(labels)))
                shapes.append(shape)
        if not rows:
            raise BrodenError(f"Broden: {path} has no rows with data in {', '.join(self.categories)}")
        for k, s in enumerate(shapes):
            if s != shapes[0]:
                raise BrodenError(f"Broden: {path} row {rows[k].line}: image/segmentation shape "
                                  f"{s} differs from {shapes[0]} (row {rows[0].line}); "
                                  f"all rows must share one (ih, iw, sh, sw)")
        self._rows = rows
        self.image_shape = shapes[0][:2]
        self.seg_shape = shapes[0][2:]
        self.image_paths = [str(self.path / "images" / r.image) for r in rows]

    # -- per image ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return (f"Broden({str(self.path)!r}, {len(self)} images, categories={self.categories}, "
                f"labels={self.num_labels}, seg_shape={self.seg_shape})")

    def _row(self, i: int) -> _Row:
        if not -len(self) <= i < len(self):
            raise IndexError(f"Broden: image {i} out of range 0..{len(self) - 1}")
        return self._rows[i]

    def image(self, i: int) -> Image.Image:
        row = self._row(i)
        path = self.path / "images" / row.image
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError as e:
            raise BrodenError(f"Broden: cannot read image {path} (index.csv row {row.line}): {e}") from None

    def planes(self, i: int) -> list[tuple[str, np.ndarray]]:
        """The label planes of image i: (category, int32 (sh, sw) label numbers)."""
        planes, problems = read_row_planes(self._job_row(self._row(i)), self.seg_shape, self.known_labels)
        for p in problems:
            self._problem(p)
        return [(self.categories[ci], a) for ci, a in planes]

    def image_labels(self, i: int) -> list[tuple[str, int]]:
        """The image-level labels of image i: (category, label number)."""
        return [(self.categories[ci], n) for ci, n in self._row(i).labels]

    def _job_row(self, row: _Row) -> tuple:
        """A picklable description of a row for worker processes."""
        images = self.path / "images"
        return (row.line, [(ci, str(images / p)) for ci, p in row.planes], [n for _, n in row.labels])

    def job_rows(self, indices: Iterable[int]) -> list[tuple]:
        return [self._job_row(self._rows[i]) for i in indices]

    # -- labels for the tally -----------------------------------------------------------
    def label_batch(self, indices) -> LabelBatch:
        """LabelBatch for dataset rows ``indices`` (packed store unless store=None)."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"Broden.label_batch: index out of range 0..{len(self) - 1}")
        if self._store_arg is None:
            encoded = []
            for i in idx.tolist():
                planes = [a for _, a in self.planes(i)]
                labels = [n for _, n in self.image_labels(i)]
                encoded.append(LabelBatch.encode_image(planes, labels, keep=self.label_keep,
                                                       seg_shape=self.seg_shape))
            return LabelBatch.from_images(encoded)
        return self.label_store.take(idx)

    @property
    def label_store(self):
        """The packed label store (labelstore.LabelStore), built or resumed on first use."""
        if self._store is None:
            if self._store_arg is None:
                raise ValueError("Broden: this dataset was opened with store=None")
            from .labelstore import LabelStore
            path = None if self._store_arg == "auto" else self._store_arg
            self._store = LabelStore.open_or_build(self, path)
        return self._store

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None                # reopened on first use after unpickling
        return state

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- identity ----------------------------------------------------------------------
    def source_record(self) -> dict:
        """What the dataset's labels are built from: sizes and mtimes of the CSVs when
        they were read, a fingerprint of the files under images/ (names, sizes and
        mtimes, not contents), and the selection."""
        if self._listing is None:
            self._listing = _listing_fingerprint(self.path / "images")
        return {"dataset": str(self.path), "files": dict(self._files), "images": self._listing,
                "categories": list(self.categories), "rows": len(self),
                "seg_shape": list(self.seg_shape), "num_labels": self.num_labels}

    def fingerprint(self) -> str:
        """Changes when the dataset files or the category selection change."""
        blob = json.dumps(self.source_record(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # -- validation ----------------------------------------------------------------------
    def validate(self, workers: int | None = 0, progress: bool = False) -> ValidationReport:
        """Read every image and label plane. Raises on the first problem, or with
        on_error="warn" reports (and skips) all of them. Prints a summary."""
        n_planes = sum(len(r.planes) for r in self._rows)
        n_labels = sum(len(r.labels) for r in self._rows)
        jobs = [(self.job_rows(range(a, min(a + 64, len(self)))), [self.image_paths[i] for i in
                 range(a, min(a + 64, len(self)))], self.seg_shape, self.known_labels)
                for a in range(0, len(self), 64)]
        for problems in parallel_map(_check_chunk, jobs, workers, "validate", progress):
            for p in problems:
                self._problem(p)
        report = ValidationReport(str(self.path), len(self), n_planes, n_labels, list(self.problems))
        print(report)
        return report


# -- helpers shared with the label store's worker processes ------------------------------
def read_label_png(path: str, seg_shape: Sequence[int], known: np.ndarray) -> np.ndarray:
    """One label plane as int32: label = R + 256 G. Raises BrodenError naming the file."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.asarray(im.convert("RGB") if mode not in ("RGB", "L", "I", "I;16") else im)
    except OSError as e:
        raise BrodenError(f"cannot read label PNG {path}: {e}") from None
    if arr.ndim == 3:
        plane = arr[..., 0].astype(np.int32) | (arr[..., 1].astype(np.int32) << 8)
    else:
        plane = arr.astype(np.int32)
    if plane.shape != tuple(seg_shape):
        raise BrodenError(f"label PNG {path} is {plane.shape[1]}x{plane.shape[0]}, expected "
                          f"{seg_shape[1]}x{seg_shape[0]} (sw x sh from index.csv)")
    present = np.flatnonzero(np.bincount(plane.ravel()))
    bad = present[(present > 0) & ((present >= len(known)) | ~known[np.minimum(present, len(known) - 1)])]
    if bad.size:
        raise BrodenError(f"label PNG {path} holds label number {int(bad[0])}, which is not in label.csv")
    return plane


def read_row_planes(job_row: tuple, seg_shape, known) -> tuple[list, list[str]]:
    """Decode a row's planes; (planes [(category index, int32 array)], problems)."""
    line, planes, _ = job_row
    out, problems = [], []
    for ci, path in planes:
        try:
            out.append((ci, read_label_png(path, seg_shape, known)))
        except BrodenError as e:
            problems.append(f"{e} (index.csv row {line})")
    return out, problems


def _check_chunk(rows, image_paths, seg_shape, known) -> list[str]:
    problems = []
    for row, image in zip(rows, image_paths):
        try:
            with Image.open(image) as im:
                im.verify()
        except OSError as e:
            problems.append(f"cannot read image {image}: {e} (index.csv row {row[0]})")
        problems += read_row_planes(row, seg_shape, known)[1]
    return problems


def parallel_map(fn: Callable, jobs: list[tuple], workers: int | None, desc: str,
                 progress: bool) -> Iterable:
    """fn(*job) for every job, results in order. workers: None = up to 8 processes when
    there are enough jobs, 0 or 1 = in this process. Spawned, not forked: safe next to
    threads (torch) and open HDF5 files."""
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if len(jobs) >= 8 else 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc=desc, unit="chunk")
    try:
        if workers <= 1:
            for job in jobs:
                yield fn(*job)
                if bar is not None:
                    bar.update()
            return
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            pending = [pool.submit(fn, *job) for job in jobs[:2 * workers]]
            for k in range(len(jobs)):
                result = pending[k].result()
                pending[k] = None                     # free it as soon as it is consumed
                if k + 2 * workers < len(jobs):
                    pending.append(pool.submit(fn, *jobs[k + 2 * workers]))
                yield result
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()


def _listing_fingerprint(images: Path) -> str:
    """Hash of the relative path, size and mtime of every file under images/, so a
    label PNG rewritten in place changes it too (one stat per file, from scandir)."""
    h = hashlib.sha256()

    def walk(folder: str, rel: str) -> None:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if e.is_dir():
                walk(e.path, rel + e.name + "/")
            else:
                try:
                    st = e.stat()
                    h.update(f"{rel}{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
                except OSError:  # a dangling link: its name still counts
                    h.update(f"{rel}{e.name}\0?\n".encode())

    walk(str(images), "")
    return h.hexdigest()[:16]
