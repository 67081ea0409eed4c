"""The result of dissecting one layer: counts, IoU, unit labels, summary, files
(SPEC §1.4, §5)."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

RESULT_ARRAYS = "results.npz"


class DissectionResult:
    def __init__(self, thresholds, intersection, cat_activation, label_pixels, categories, label_names,
                 primary_category, rule="paper", top=None, meta=None, images=0):
        self.thresholds = np.asarray(thresholds, np.float64)
        self.intersection = np.asarray(intersection, np.int64)
        self.cat_activation = np.asarray(cat_activation, np.int64)
        self.label_pixels = np.asarray(label_pixels, np.int64)
        self.categories = list(categories)
        self.label_names = list(label_names)
        self.primary_category = np.asarray(primary_category, np.int16)
        self.rule = rule
        self.top = top
        self.meta = dict(meta or {})
        self.images = int(images)
        K, L = self.intersection.shape
        if self.thresholds.shape != (K,) or self.label_pixels.shape != (L,) or \
                self.cat_activation.shape != (K, len(self.categories)) or self.primary_category.shape != (L,):
            raise ValueError("DissectionResult: inconsistent array shapes")
        self._iou = None

    # -- derived arrays ------------------------------------------------------
    @property
    def num_units(self) -> int:
        return self.intersection.shape[0]

    @property
    def activation(self) -> np.ndarray:
        """A[k, c] (K, L): unit k's mask size over the images counted for c's category."""
        cat = self.primary_category.astype(np.int64)
        A = np.zeros_like(self.intersection)
        ok = cat >= 0
        A[:, ok] = self.cat_activation[:, cat[ok]]
        return A

    @property
    def iou(self) -> np.ndarray:
        """IoU[k, c] = I / (A + G - I), 0 where the denominator is 0 (float64, K×L)."""
        if self._iou is None:
            I = self.intersection
            denom = self.activation + self.label_pixels[None, :] - I
            iou = np.zeros(I.shape, np.float64)
            np.divide(I, denom, out=iou, where=denom > 0)
            self._iou = iou
        return self._iou

    # -- labels -------------------------------------------------------------
    def best_labels(self):
        """Per unit: (label number, IoU) of the highest-IoU label, ties to the lowest number."""
        iou = self.iou
        best = np.argmax(iou, axis=1)  # first maximum = lowest label number
        return best, iou[np.arange(self.num_units), best]

    def table(self) -> list[dict]:
        """One row per unit (0-based ``unit``): label, label_name, category, iou."""
        best, score = self.best_labels()
        rows = []
        for k in range(self.num_units):
            lab = int(best[k])
            c = int(self.primary_category[lab])
            rows.append(dict(unit=k, label=lab, label_name=self.label_names[lab],
                             category=self.categories[c] if (c >= 0 and score[k] > 0) else None,
                             iou=float(score[k])))
        return rows

    def summary(self, iou_threshold: float = 0.04, inclusive: bool = False) -> dict:
        """Detectors and unique detectors per category. A unit is a detector when its
        best IoU > iou_threshold (>= with ``inclusive=True``, NetDissect-Lite's rule)."""
        best, score = self.best_labels()
        is_det = score >= iou_threshold if inclusive else score > iou_threshold
        is_det &= score > 0
        detectors = {c: 0 for c in self.categories}
        unique = {c: set() for c in self.categories}
        for k in np.nonzero(is_det)[0]:
            c = self.categories[int(self.primary_category[best[k]])]
            detectors[c] += 1
            unique[c].add(int(best[k]))
        return dict(iou_threshold=float(iou_threshold), inclusive=bool(inclusive), num_units=self.num_units,
                    detectors=detectors, unique_detectors={c: len(v) for c, v in unique.items()},
                    total_detectors=int(is_det.sum()),
                    total_unique_detectors=int(sum(len(v) for v in unique.values())),
                    unique_labels={c: sorted(self.label_names[x] for x in v) for c, v in unique.items()})

    # -- files ---------------------------------------------------------------
    def save(self, directory, report: bool = True, iou_threshold: float = 0.04, dataset=None) -> Path:
        """Write results.npz, tally.csv, summary.json (and report.html) into ``directory``.
        Each file is written to a temporary name first, so a crash never leaves a
        half-written file under the final name."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        arrays = dict(thresholds=self.thresholds, intersection=self.intersection, activation=self.activation,
                      label_pixels=self.label_pixels, iou=self.iou, cat_activation=self.cat_activation,
                      primary_category=self.primary_category)
        if self.top is not None:
            arrays.update(top_indices=self.top.indices, top_values=self.top.values)
            if getattr(self.top, "maps", None) is not None:
                arrays["top_maps"] = self.top.maps
        _atomic(d / RESULT_ARRAYS, lambda f: np.savez(f, **arrays))
        _atomic(d / "tally.csv", lambda f: self._write_tally_csv(f), text=True)
        summ = self.summary(iou_threshold)
        doc = dict(meta=self.meta, rule=self.rule, images=self.images, categories=self.categories,
                   label_names=self.label_names, primary_category=self.primary_category.tolist(),
                   units=self.table(), num_units=self.num_units, iou_threshold=float(iou_threshold),
                   detectors=summ["detectors"], unique_detectors=summ["unique_detectors"],
                   total_detectors=summ["total_detectors"],
                   total_unique_detectors=summ["total_unique_detectors"],
                   unique_labels=summ["unique_labels"])
        _atomic(d / "summary.json", lambda f: json.dump(doc, f, indent=1), text=True)
        if report:
            from .report import write_report
            write_report(d, dataset=dataset)
        return d

    def _write_tally_csv(self, f) -> None:
        """NetDissect-Lite's layout: unit (1-based), category, label, score, then per
        category its best label's name, truth (G), activation (A), intersect (I), iou."""
        iou, A = self.iou, self.activation
        best, score = self.best_labels()
        cat_labels = [np.nonzero(self.primary_category == c)[0] for c in range(len(self.categories))]
        header = ["unit", "category", "label", "score"]
        for c in self.categories:
            header += [f"{c}-label", f"{c}-truth", f"{c}-activation", f"{c}-intersect", f"{c}-iou"]
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for k in sorted(range(self.num_units), key=lambda u: (-score[u], u)):
            c = int(self.primary_category[best[k]])
            row = [k + 1, self.categories[c] if c >= 0 else "", self.label_names[best[k]], f"{score[k]:.6f}"]
            for labels in cat_labels:
                if labels.size == 0:
                    row += ["", 0, 0, 0, "0.000000"]
                    continue
                lab = int(labels[np.argmax(iou[k, labels])])
                row += [self.label_names[lab], int(self.label_pixels[lab]), int(A[k, lab]),
                        int(self.intersection[k, lab]), f"{iou[k, lab]:.6f}"]
            w.writerow(row)

    @classmethod
    def load(cls, directory) -> "DissectionResult":
        d = Path(directory)
        try:
            doc = json.loads((d / "summary.json").read_text())
            z = np.load(d / RESULT_ARRAYS)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{d} is not a saved dissection result (missing {Path(e.filename).name})") from e
        top = None
        if "top_indices" in z.files:
            from .topimages import TopImages
            ti = z["top_indices"]
            top = TopImages.from_state(dict(indices=ti, values=z["top_values"],
                                            maps=z["top_maps"] if "top_maps" in z.files else None))
        return cls(z["thresholds"], z["intersection"], z["cat_activation"], z["label_pixels"], doc["categories"],
                   doc["label_names"], z["primary_category"], rule=doc.get("rule", "paper"), top=top,
                   meta=doc.get("meta"), images=doc.get("images", 0))

    def __repr__(self) -> str:
        s = self.summary()
        return (f"DissectionResult(units={self.num_units}, labels={len(self.label_names)}, images={self.images}, "
                f"unique_detectors={s['total_unique_detectors']})")


def _atomic(path: Path, write, text: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if text:
        with open(tmp, "w", newline="") as f:
            write(f)
    else:
        with open(tmp, "wb") as f:
            write(f)
    os.replace(tmp, path)
