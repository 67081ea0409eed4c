"""HTML dissection report (SPEC §5) and a comparison page for several results.

`write_report(result_dir)` reads a directory written by `DissectionResult.save` and
writes `report.html` plus a `report_images/` folder beside it: two SVG charts and one
JPEG strip per unit (its top images side by side, the unit's mask drawn on each). The
page is self-contained: no network, no external script or style, so it opens from disk
or from an archive. `write_comparison(result_dirs, out_path)` draws unique detectors per
category for several layers or models side by side.

Speed (K = 2048 units x 10 images): every dataset image is decoded once, at thumbnail
size, however many strips show it; masks are computed for a block of units at a time
with array operations; blocks are composed and JPEG-encoded in a thread pool (numpy,
PIL's codecs release the GIL).
"""
from __future__ import annotations

import html
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

THUMB_HEIGHT = 96          # pixels; thumbnails keep the dataset's aspect ratio
STRIP_GAP = 2              # pixels between thumbnails in a strip
UNITS_PER_BLOCK = 32       # units composed together: bounds memory, feeds the pool
DIM = 0.3                  # brightness kept outside a unit's mask
OUTLINE_RGB = (255, 214, 0)
EMPTY_RGB = (236, 236, 236)
JPEG_QUALITY = 85

# Broden's categories keep one colour across every chart; others cycle a palette.
CATEGORY_COLORS = {"object": "#1f77b4", "scene": "#2ca02c", "part": "#ff7f0e",
                   "material": "#8c564b", "texture": "#9467bd", "color": "#d62728"}
_OTHER_COLORS = ["#17becf", "#bcbd22", "#7f7f7f", "#e377c2", "#aec7e8", "#98df8a"]


# -- reading a saved result -------------------------------------------------------
@dataclass
class _Saved:
    """What the report needs from a result directory (see DissectionResult.save)."""
    path: Path
    summary: dict
    arrays: dict

    @property
    def meta(self) -> dict:
        return self.summary.get("meta") or {}


def _read_summary(result_dir) -> dict:
    path = Path(result_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {result_dir} a saved dissection result?")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


_REPORT_ARRAYS = ("thresholds", "iou", "top_indices", "top_values", "top_maps")


def _load_saved(result_dir) -> _Saved:
    """Reads results.npz and summary.json directly, so the report does not depend on
    the result class's loader (nor its imports). Only the arrays the report draws are
    read; an optional array saved as None (an object array) counts as absent."""
    result_dir = Path(result_dir)
    summary = _read_summary(result_dir)
    npz_path = result_dir / "results.npz"
    if not npz_path.is_file():
        raise FileNotFoundError(f"{npz_path}: missing; is {result_dir} a saved dissection result?")
    arrays = {}
    with np.load(npz_path, allow_pickle=False) as npz:
        for name in _REPORT_ARRAYS:
            if name in npz.files:
                try:
                    arrays[name] = npz[name]
                except ValueError:           # object array: refused without pickle
                    if name == "thresholds":
                        raise ValueError(f"{npz_path}: 'thresholds' is not a numeric array") from None
    if "thresholds" not in arrays:
        raise ValueError(f"{npz_path}: has no 'thresholds' array")
    K = len(arrays["thresholds"])
    for name, array in arrays.items():
        if array.shape[0] != K:
            raise ValueError(f"{npz_path}: '{name}' has {array.shape[0]} rows, thresholds has {K}")
    if "top_indices" in arrays and "top_values" not in arrays:
        raise ValueError(f"{npz_path}: has 'top_indices' but no 'top_values'")
    return _Saved(result_dir, summary, arrays)


def _unit_table(saved: _Saved) -> list[dict]:
    """One dict per unit: unit, label, label_name, category, iou, threshold, detector.

    Taken from summary.json's `units`; derived from the IoU matrix (best label, ties to
    the lowest number) when the summary lacks them."""
    summary, arrays = saved.summary, saved.arrays
    thresholds = arrays["thresholds"]
    iou_threshold = float(summary.get("iou_threshold", 0.04))
    inclusive = bool(summary.get("inclusive", False))        # NetDissect-Lite's >=
    units = summary.get("units")
    if units is None:
        if "iou" not in arrays:
            raise ValueError(f"{saved.path}: summary.json has no 'units' and results.npz no 'iou'")
        names = summary.get("label_names") or []
        categories = summary.get("categories") or []
        primary = summary.get("primary_category") or []
        best = np.argmax(arrays["iou"], axis=1)
        units = []
        for k, label in enumerate(best.tolist()):
            cat = primary[label] if label < len(primary) else -1
            units.append({"unit": k, "label": label,
                          "label_name": names[label] if label < len(names) else str(label),
                          "category": categories[cat] if cat >= 0 else "",
                          "iou": float(arrays["iou"][k, label])})
    table = []
    for u in units:
        k = int(u["unit"])
        if not 0 <= k < len(thresholds):
            raise ValueError(f"{saved.path}/summary.json: unit {k} outside 0..{len(thresholds) - 1}")
        iou = float(u.get("iou", 0.0))
        above = iou >= iou_threshold if inclusive else iou > iou_threshold
        table.append({"unit": k, "label": int(u.get("label", 0)),
                      "label_name": str(u.get("label_name", "-")),
                      "category": str(u.get("category") or ""), "iou": iou,
                      "threshold": float(thresholds[k]),
                      "detector": bool(u.get("detector", above and iou > 0))})
    return table


def _category_color(category: str, categories: list) -> str:
    if category in CATEGORY_COLORS:
        return CATEGORY_COLORS[category]
    others = [c for c in categories if c not in CATEGORY_COLORS]
    i = others.index(category) if category in others else len(others)
    return _OTHER_COLORS[i % len(_OTHER_COLORS)]


# -- charts (matplotlib, SVG files) ---------------------------------------------
def _save_svg(fig, path: Path) -> None:
    # Glyphs as paths: the SVG needs no font; no date, so reruns give identical files.
    import matplotlib
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "netdissect_fast"}):
        fig.savefig(path, format="svg", metadata={"Date": None}, bbox_inches="tight")


def _bar_chart(path: Path, names: list, values: list, colors: list, title: str, ylabel: str,
               rotate: bool = False) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    width = min(40.0, max(4.5, 0.22 * len(names) + 1.5))
    fig = Figure(figsize=(width, 2.8 if not rotate else 3.6))
    ax = fig.add_subplot()
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if names:
        x = np.arange(len(names))
        bars = ax.bar(x, values, color=colors)
        ax.set_xticks(x, names, rotation=90 if rotate else 0, fontsize=8 if rotate else 10)
        ax.bar_label(bars, fontsize=8)
        ax.set_xlim(-0.6, len(names) - 0.4)
    else:
        ax.text(0.5, 0.5, "no detectors", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.spines[["top", "right"]].set_visible(False)
    _save_svg(fig, path)


def _summary_charts(saved: _Saved, table: list[dict], image_dir: Path) -> list[tuple[str, str]]:
    """Unique detectors per category and units per detected label; returns (file, caption)."""
    categories = list(saved.summary.get("categories") or [])
    unique = saved.summary.get("unique_detectors") or {}
    _bar_chart(image_dir / "unique_detectors.svg", categories,
               [int(unique.get(c, 0)) for c in categories],
               [_category_color(c, categories) for c in categories],
               "Unique detectors per category", "unique detectors")
    counts: dict[tuple[str, str], int] = {}
    for row in table:
        if row["detector"]:
            key = (row["label_name"], row["category"])
            counts[key] = counts.get(key, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    _bar_chart(image_dir / "detector_labels.svg", [name for (name, _), _ in ranked],
               [n for _, n in ranked], [_category_color(c, categories) for (_, c), _ in ranked],
               "Units per detected label", "units", rotate=True)
    return [("unique_detectors.svg", "Unique detectors per category"),
            ("detector_labels.svg", "Units per detected label, coloured by category")]


# -- masks and strips ---------------------------------------------------------------
def _bilinear_weights(src: int, dst: int) -> np.ndarray:
    """(dst, src) matrix of bilinear upsampling with half-pixel centres and edge clamping
    (torch's align_corners=False): row i samples source coordinate (i + 0.5)·src/dst − 0.5."""
    x = np.clip((np.arange(dst) + 0.5) * (src / dst) - 0.5, 0, None)
    lo = np.minimum(np.floor(x).astype(np.int64), src - 1)
    hi = np.minimum(lo + 1, src - 1)
    frac = (x - lo).astype(np.float32)
    w = np.zeros((dst, src), np.float32)
    np.add.at(w, (np.arange(dst), lo), 1 - frac)
    np.add.at(w, (np.arange(dst), hi), frac)
    return w


def _receptive_field_weights(src: int, dst: int, seg: int, stride: float, offset: float, y_axis: bool):
    """(dst, src) matrix of receptive-field upsampling (the kernels' own weights, at
    segmentation size ``seg``) sampled at the centres of ``dst`` thumbnail pixels."""
    from . import _C
    rf = (stride, stride, offset, offset)
    full = _C.upsample_matrix(1, y_axis, src, seg, rf)
    rows = np.minimum(((np.arange(dst) + 0.5) * seg / dst).astype(np.int64), seg - 1)
    return full[rows]


def _mask_weights(settings: dict, map_shape, size) -> tuple[np.ndarray, np.ndarray]:
    """Row and column weights that upsample (h, w) maps to thumbnail ``size`` (H, W)
    as the dissection did: bilinear, or receptive-field when it was counted that way."""
    (h, w), (H, W) = map_shape, size
    rf, seg = settings.get("receptive_field"), settings.get("seg_shape")
    if settings.get("upsample") == "receptive_field" and rf is not None and seg is not None:
        sy, sx, oy, ox = rf
        return (_receptive_field_weights(h, H, seg[0], sy, oy, True),
                _receptive_field_weights(w, W, seg[1], sx, ox, False))
    return _bilinear_weights(h, H), _bilinear_weights(w, W)


def _upsample(maps: np.ndarray, size: tuple[int, int], settings: dict | None = None) -> np.ndarray:
    """Upsampling of (..., h, w) maps to (..., H, W) float32 as two small matrix
    products: bilinear as torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False) (equal to float rounding), or with the receptive-field weights
    the dissection used. No torch import (a second at start-up) and no competition
    with the thread pool for torch's threads.

    Masks are made at thumbnail size: that samples the same surface as the
    image-size upsampling, at the pixels actually shown."""
    wy, wx = _mask_weights(settings or {}, maps.shape[-2:], size)
    return (wy @ np.asarray(maps, np.float32)) @ wx.T


def _pack_rgbx(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) uint32 holding R, G, B, 255 in memory order: one word per
    pixel, so selecting whole pixels needs no broadcast over a length-3 axis (slow)."""
    rgbx = np.empty(rgb.shape[:-1] + (4,), np.uint8)
    rgbx[..., :3] = rgb
    rgbx[..., 3] = 255
    return rgbx.view(np.uint32)[..., 0]


OUTLINE_WORD = _pack_rgbx(np.array(OUTLINE_RGB, np.uint8))[()]
WHITE_WORD = _pack_rgbx(np.array([255, 255, 255], np.uint8))[()]


def _dimmed(words: np.ndarray) -> np.ndarray:
    """Packed RGBX words at DIM of their brightness (integer arithmetic: fast)."""
    channels = words.view(np.uint8).astype(np.uint16)
    return ((channels * round(DIM * 256)) >> 8).astype(np.uint8).view(np.uint32)


def _draw_masks(bright: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """bright: (..., H, W) packed RGBX words; masks (..., H, W) bool. Returns the
    region as is, the rest dimmed, and a 2-pixel outline on the region's edge."""
    m = masks
    # 4-neighbour dilation and erosion; edge padding so image borders draw no outline.
    p = np.pad(m, [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    up, down = p[..., :-2, 1:-1], p[..., 2:, 1:-1]
    left, right = p[..., 1:-1, :-2], p[..., 1:-1, 2:]
    outline = (m | up | down | left | right) & ~(m & up & down & left & right)
    return np.where(outline, OUTLINE_WORD, np.where(m, bright, _dimmed(bright)))


def _thumbnail(dataset, index: int, size: tuple[int, int]) -> np.ndarray:
    """Dataset image `index` as (th, tw, 3) uint8; size is (tw, th)."""
    paths = getattr(dataset, "image_paths", None)
    if paths is not None:
        # Open the file ourselves: JPEG draft mode decodes at a reduced DCT scale.
        with Image.open(paths[index]) as im:
            im.draft("RGB", size)
            im = im.convert("RGB")
    else:
        im = dataset.image(index).convert("RGB")
    if im.size != size:
        im = im.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(im)


def _thumb_size(dataset) -> tuple[int, int]:
    shape = getattr(dataset, "image_shape", None)
    if shape is None:
        ih, iw = np.asarray(dataset.image(0)).shape[:2]
    else:
        ih, iw = shape
    return max(1, round(THUMB_HEIGHT * iw / ih)), THUMB_HEIGHT


def _render_strips(saved: _Saved, dataset, image_dir: Path, top_n: int, pool) -> dict:
    """Writes unit_<k>.jpg for every unit with at least one top image; returns
    {unit: (file name, width, height, images per strip)}."""
    arrays = saved.arrays
    indices = arrays["top_indices"][:, :top_n].astype(np.int64)
    K = indices.shape[0]
    wanted = np.unique(indices[indices >= 0])
    if wanted.size == 0:
        return {}
    if dataset is None:
        dataset = _open_dataset(saved)
    n_images = len(dataset) if hasattr(dataset, "__len__") else None
    if n_images is not None and wanted[-1] >= n_images:
        raise ValueError(f"{saved.path}/results.npz: top image {int(wanted[-1])} is outside the "
                         f"dataset ({n_images} images); was the result made on another dataset?")
    tw, th = _thumb_size(dataset)

    # Decode each image once (th·tw·4 bytes each: 37 KB at 96 px); slot 0 is the blank
    # tile of empty slots.
    thumbs = np.empty((wanted.size + 1, th, tw), np.uint32)
    thumbs[0] = _pack_rgbx(np.array(EMPTY_RGB, np.uint8))

    def decode(j):
        thumbs[j + 1] = _pack_rgbx(_thumbnail(dataset, int(wanted[j]), (tw, th)))
    list(pool.map(decode, range(wanted.size)))
    slot = np.where(indices >= 0, np.searchsorted(wanted, indices) + 1, 0)

    maps = arrays.get("top_maps")
    if maps is not None:
        maps = maps[:, :top_n]
    settings = saved.meta.get("settings", {})
    thresholds = arrays["thresholds"].astype(np.float32)
    n = indices.shape[1]
    strip_w = n * (tw + STRIP_GAP) - STRIP_GAP

    def render(start):
        stop = min(start + UNITS_PER_BLOCK, K)
        U, block = stop - start, slot[start:stop]
        tiles = thumbs[block]                                    # (U, n, th, tw)
        if maps is not None:
            masks = _upsample(maps[start:stop], (th, tw), settings) > thresholds[start:stop, None, None, None]
            masks |= (block == 0)[..., None, None]               # blank tiles stay light
            tiles = _draw_masks(tiles, masks)
        # Side by side with a white gap: (U, n, th, tw+gap) -> (U, th, n*(tw+gap)).
        padded = np.full((U, n, th, tw + STRIP_GAP), WHITE_WORD, np.uint32)
        padded[..., :tw] = tiles
        strips = np.ascontiguousarray(padded.transpose(0, 2, 1, 3).reshape(U, th, -1)[..., :strip_w])
        done = {}
        for u in range(U):
            k = start + u
            if block[u].max() == 0:
                continue
            name = f"unit_{k:04d}.jpg"
            Image.frombuffer("RGBX", (strip_w, th), strips[u], "raw", "RGBX", 0, 1).save(
                image_dir / name, quality=JPEG_QUALITY)
            done[k] = (name, strip_w, th, n)
        return done

    strips = {}
    for part in pool.map(render, range(0, K, UNITS_PER_BLOCK)):
        strips.update(part)
    return strips


def _open_dataset(saved: _Saved):
    path = saved.meta.get("dataset")
    if not path:
        raise ValueError(f"{saved.path}/summary.json: meta has no 'dataset' path; "
                         f"pass dataset= to write_report")
    from netdissect_fast.broden import Broden
    return Broden(path)


# -- HTML ---------------------------------------------------------------------------
_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; margin: 0 0 .4em; }
table { border-collapse: collapse; }
.meta td, .meta th, .counts td, .counts th { padding: 2px 10px 2px 0; text-align: left; }
.counts td.n { text-align: right; }
.charts { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; margin: 1em 0; }
.charts figure { margin: 0; max-width: 100%; overflow-x: auto; }
.charts img { max-width: none; }
#units th, #units td { padding: 4px 10px 4px 0; vertical-align: middle; text-align: left; }
#units thead th { position: sticky; top: 0; z-index: 1; background: #fff; border-bottom: 1px solid #999; }
#units th[data-key] { cursor: pointer; user-select: none; white-space: nowrap; }
#units th[aria-sort=ascending]::after { content: " \\25B2"; }
#units th[aria-sort=descending]::after { content: " \\25BC"; }
#units td.num { font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: .8em; height: .8em; border-radius: 2px;
          margin-right: .3em; vertical-align: baseline; }
tbody.below tr.unit { opacity: .5; filter: grayscale(1); }
tr.section th { text-align: left; padding-top: 1.2em; font-size: 1.1em; border-bottom: 1px solid #999; }
.small { color: #666; font-size: .85em; }
"""

# Sorting: rows keep their section (detectors, then units below the threshold).
_SCRIPT = """
(function () {
  var headers = document.querySelectorAll('#units th[data-key]');
  headers.forEach(function (th) {
    th.addEventListener('click', function () {
      var key = th.dataset.key, numeric = th.dataset.type === 'number';
      var dir = th.getAttribute('aria-sort') === 'ascending' ? 'descending' : 'ascending';
      headers.forEach(function (h) { h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', dir);
      var sign = dir === 'ascending' ? 1 : -1;
      document.querySelectorAll('#units tbody.units').forEach(function (body) {
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.dataset[key], y = b.dataset[key];
          var c = numeric ? Number(x) - Number(y) : x.localeCompare(y);
          return sign * c || Number(a.dataset.unit) - Number(b.dataset.unit);
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
})();
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: str, script: str = "") -> str:
    script_tag = f"<script>{script}</script>\n" if script else ""
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_esc(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"{body}\n{script_tag}</body>\n</html>\n")


def _counts_table(summary: dict) -> str:
    categories = list(summary.get("categories") or [])
    detectors = summary.get("detectors") or {}
    unique = summary.get("unique_detectors") or {}
    rows = ["<tr><th>category</th><th>detectors</th><th>unique detectors</th></tr>"]
    for c in categories:
        rows.append(f"<tr><td><span class=\"swatch\" style=\"background:"
                    f"{_category_color(c, categories)}\"></span>{_esc(c)}</td>"
                    f"<td class=\"n\">{int(detectors.get(c, 0))}</td>"
                    f"<td class=\"n\">{int(unique.get(c, 0))}</td></tr>")
    rows.append(f"<tr><th>total</th><td class=\"n\">{sum(int(detectors.get(c, 0)) for c in categories)}"
                f"</td><td class=\"n\">{sum(int(unique.get(c, 0)) for c in categories)}</td></tr>")
    return "<table class=\"counts\">\n" + "\n".join(rows) + "\n</table>"


def _meta_table(saved: _Saved, num_units: int) -> str:
    meta = saved.meta
    items = [("model", meta.get("model", "?")), ("layer", meta.get("layer", "?")),
             ("dataset", meta.get("dataset", "?")), ("units", num_units),
             ("IoU threshold", saved.summary.get("iou_threshold", 0.04))]
    items += [(k, v) for k, v in (meta.get("settings") or {}).items()]
    return "<table class=\"meta\">\n" + "\n".join(
        f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in items) + "\n</table>"


def _unit_row(row: dict, strip, image_dir_name: str, categories: list, arrays: dict) -> str:
    color = _category_color(row["category"], categories) if row["category"] else "#ccc"
    if strip is None:
        images = "<span class=\"small\">no images</span>"
    else:
        name, w, h, n = strip
        k = row["unit"]
        hint = ", ".join(f"#{i} ({v:.3g})" for i, v in zip(arrays["top_indices"][k, :n].tolist(),
                                                            arrays["top_values"][k, :n].tolist()) if i >= 0)
        images = (f"<img src=\"{_esc(image_dir_name)}/{_esc(name)}\" width=\"{w}\" height=\"{h}\" "
                  f"alt=\"unit {row['unit']}: top images\" title=\"images (max activation): "
                  f"{_esc(hint)}\">")
    return (f"<tr class=\"unit\" data-unit=\"{row['unit']}\" data-label=\"{_esc(row['label_name'])}\" "
            f"data-category=\"{_esc(row['category'])}\" data-iou=\"{row['iou']:.6f}\">"
            f"<td class=\"num\">{row['unit']}</td><td>{_esc(row['label_name'])}</td>"
            f"<td><span class=\"swatch\" style=\"background:{color}\"></span>{_esc(row['category'])}</td>"
            f"<td class=\"num\">{row['iou']:.3f}<br>"
            f"<span class=\"small\">T={row['threshold']:.3g}</span></td>"
            f"<td>{images}</td></tr>")


def _output_paths(result_dir: Path, out) -> tuple[Path, Path]:
    if out is None:
        html_path = result_dir / "report.html"
    else:
        html_path = Path(out)
        if html_path.is_dir() or str(out).endswith(os.sep):
            html_path = html_path / "report.html"
    # report.html -> report_images/: two reports in one folder keep their own images.
    image_dir = html_path.with_name(html_path.stem + "_images")
    return html_path, image_dir


def write_report(result_dir, dataset=None, out=None, top_n=None) -> Path:
    """Write the HTML report of the saved result in ``result_dir``; returns its path.

    dataset: the dataset the result was computed on (anything with ``image(i)`` and
    ``image_shape``; ``image_paths`` makes decoding faster); None opens
    ``Broden(meta["dataset"])``, and only if some unit has top images.
    out: the HTML file (or a folder for report.html); default result_dir/report.html.
    top_n: images shown per unit (default: all stored).
    """
    result_dir = Path(result_dir)
    saved = _load_saved(result_dir)
    table = _unit_table(saved)
    html_path, image_dir = _output_paths(result_dir, out)
    image_dir.mkdir(parents=True, exist_ok=True)
    for stale in image_dir.glob("unit_*.jpg"):       # from an earlier render of this report
        stale.unlink()

    arrays = saved.arrays
    stored = arrays["top_indices"].shape[1] if "top_indices" in arrays else 0
    top_n = stored if top_n is None else max(0, min(int(top_n), stored))
    strips = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        if top_n > 0:
            strips = _render_strips(saved, dataset, image_dir, top_n, pool)
    charts = _summary_charts(saved, table, image_dir)

    categories = list(saved.summary.get("categories") or [])
    order = sorted(table, key=lambda r: (-r["iou"], r["unit"]))
    rel = image_dir.name

    def rows(selected):
        return "\n".join(_unit_row(r, strips.get(r["unit"]), rel, categories, arrays) for r in selected)

    detectors = [r for r in order if r["detector"]]
    below = [r for r in order if not r["detector"]]
    meta = saved.meta
    title = f"Dissection of {meta.get('model', '?')} / {meta.get('layer', '?')}"
    how = ("with the receptive-field weights it was counted with"
           if meta.get("settings", {}).get("upsample") == "receptive_field" else "bilinearly")
    figures = "\n".join(f"<figure><img src=\"{_esc(rel)}/{name}\" alt=\"{_esc(caption)}\">"
                        f"<figcaption class=\"small\">{_esc(caption)}</figcaption></figure>"
                        for name, caption in charts)
    threshold = saved.summary.get("iou_threshold", 0.04)
    body = f"""<header>
<h1>{_esc(title)}</h1>
<div class="charts"><div>{_meta_table(saved, len(table))}</div><div>{_counts_table(saved.summary)}</div></div>
</header>
<section class="charts">
{figures}
</section>
<p class="small">Units sorted by IoU; click a column header to sort. Each image shows the unit's
activation map upsampled {how} and thresholded at the unit's threshold T: the region above
T bright and outlined, the rest dimmed.</p>
<table id="units">
<thead><tr><th data-key="unit" data-type="number">Unit</th><th data-key="label">Label</th>
<th data-key="category">Category</th>
<th data-key="iou" data-type="number" aria-sort="descending">IoU</th><th>Top images</th></tr></thead>
<tbody><tr class="section"><th colspan="5">Detectors: IoU above {_esc(threshold)} ({len(detectors)} units)</th></tr></tbody>
<tbody class="units detectors">
{rows(detectors)}
</tbody>
<tbody><tr class="section"><th colspan="5">Below the IoU threshold ({len(below)} units)</th></tr></tbody>
<tbody class="units below">
{rows(below)}
</tbody>
</table>"""
    html_path.write_text(_page(title, body, _SCRIPT), encoding="utf-8")
    return html_path


# -- comparison of several results -------------------------------------------------
def _result_names(summaries: list[dict], dirs: list[Path]) -> list[str]:
    names = [f"{s.get('meta', {}).get('model', '?')} {s.get('meta', {}).get('layer', '?')}"
             for s in summaries]
    # Same model and layer (other settings): tell them apart by directory.
    return [f"{n} ({d.name})" if names.count(n) > 1 else n for n, d in zip(names, dirs)]


def write_comparison(result_dirs, out_path) -> Path:
    """Unique detectors per category for several saved results, as a grouped bar chart
    and a table, in one HTML page at ``out_path`` (chart in <stem>_images/)."""
    dirs = [Path(d) for d in result_dirs]
    if not dirs:
        raise ValueError("write_comparison: result_dirs is empty")
    summaries = [_read_summary(d) for d in dirs]
    names = _result_names(summaries, dirs)
    categories = []
    for s in summaries:                      # union, in first-seen order
        categories += [c for c in s.get("categories") or [] if c not in categories]
    unique = np.array([[int((s.get("unique_detectors") or {}).get(c, 0)) for c in categories]
                       for s in summaries])
    detectors = np.array([[int((s.get("detectors") or {}).get(c, 0)) for c in categories]
                          for s in summaries])

    out_path = Path(out_path)
    image_dir = out_path.with_name(out_path.stem + "_images")
    image_dir.mkdir(parents=True, exist_ok=True)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    fig = Figure(figsize=(min(40.0, max(6.0, 0.25 * len(dirs) * max(1, len(categories)) + 2)), 4.0))
    ax = fig.add_subplot()
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    x = np.arange(len(dirs))
    width = 0.8 / max(1, len(categories))
    for j, c in enumerate(categories):
        bars = ax.bar(x + (j - (len(categories) - 1) / 2) * width, unique[:, j], width,
                      label=c, color=_category_color(c, categories))
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, names, rotation=20 if len(dirs) > 3 else 0, ha="right" if len(dirs) > 3 else "center")
    ax.set_ylabel("unique detectors")
    ax.set_title("Unique detectors per category")
    ax.spines[["top", "right"]].set_visible(False)
    if categories:
        ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save_svg(fig, image_dir / "comparison.svg")

    head = "".join(f"<th>{_esc(c)}</th>" for c in categories)
    rows = []
    for i, (d, s) in enumerate(zip(dirs, summaries)):
        report = d / "report.html"
        name = _esc(names[i])
        if report.is_file():
            name = f"<a href=\"{_esc(Path(os.path.relpath(report, out_path.parent)).as_posix())}\">{name}</a>"
        cells = "".join(f"<td class=\"n\">{v}</td>" for v in unique[i])
        rows.append(f"<tr><td>{name}</td>{cells}<td class=\"n\">{unique[i].sum()}</td>"
                    f"<td class=\"n\">{detectors[i].sum()}</td>"
                    f"<td class=\"n\">{_esc(s.get('num_units', '?'))}</td></tr>")
    body = f"""<h1>Unique detectors per category</h1>
<figure><img src="{_esc(image_dir.name)}/comparison.svg" alt="Unique detectors per category"></figure>
<table class="counts">
<tr><th>result</th>{head}<th>unique</th><th>detectors</th><th>units</th></tr>
{chr(10).join(rows)}
</table>"""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(_page("Dissection comparison", body), encoding="utf-8")
    return out_path
