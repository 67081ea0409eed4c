"""Every SIMD variant of the CPU kernels (AVX-512, AVX2+FMA, baseline x86-64)
gives the same thresholds and counts. The variant is fixed when the extension
loads, so each one runs in its own process (NDF_CPU_ISA caps the choice)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = r"""
import sys, numpy as np
sys.path.insert(0, {tests!r})
import netdissect_fast as ndf
from netdissect_fast.tally import Tally
from synthetic import random_dataset, smooth_activations
rng = np.random.default_rng(5)
ds = random_dataset(rng, n_images=6, seg_shape=(113, 113), block=9)
acts = smooth_activations(rng, 6, 37, 13, 13)
q = ndf.QuantileSketch(37, q=0.98, total=6 * 169, device="cpu")
m = np.empty((3, 37), np.float32)
for s in (0, 3):
    q.update(acts[s:s + 3], maxima_out=m)
thr = q.thresholds()
t = Tally(ds, thr, rule="netdissect-lite", device="cpu").update(acts, np.arange(6))
wide = smooth_activations(rng, 6, 5, 5, 20)  # maps wider than one AVX-512 register
thr2 = np.quantile(np.moveaxis(wide, 1, 0).reshape(5, -1).astype(np.float64), 0.97, axis=1)
t2 = Tally(ds, thr2, device="cpu").update(wide, np.arange(6))
np.savez({out!r}, isa=ndf.backends()["cpu"]["detail"], thr=thr, maxima=m, I=t.intersection,
         A=t.cat_activation, G=t.label_pixels, I2=t2.intersection, A2=t2.cat_activation)
"""


def run_variant(isa, tmp_path):
    out = tmp_path / f"{isa}.npz"
    env = dict(os.environ, NDF_CPU_ISA=isa, NDF_SLOT_MIN_UNITS="0")  # avx512: the slot counter even at K=37
    code = SCRIPT.format(tests=str(Path(__file__).parent), out=str(out))
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return np.load(out)


def test_simd_variants_agree(tmp_path):
    base = run_variant("baseline", tmp_path)
    assert "SIMD baseline" in str(base["isa"])
    for isa in ("avx2", "avx512-sets", "avx512"):
        other = run_variant(isa, tmp_path)
        for name in ("thr", "maxima", "I", "A", "G", "I2", "A2"):
            np.testing.assert_array_equal(other[name], base[name], err_msg=f"{isa} vs baseline: {name}")
    assert base["I"].sum() > 0 and base["I2"].sum() > 0


QUANTILE_SCRIPT = r"""
import numpy as np
import netdissect_fast as ndf
rng = np.random.default_rng(8)
# Map sizes for every code path of the fused scan (1..4 register vectors, longer
# maps read twice), each compacting many times (q=0.9 keeps a tenth), with maxima.
for h, w in ((1, 1), (4, 4), (5, 6), (7, 7), (8, 8), (9, 9), (20, 20)):
    x = np.maximum(rng.standard_normal((300, 6, h, w)), 0).astype(np.float32)
    s = ndf.QuantileSketch(6, q=0.9, total=300 * h * w, device="cpu", threads=2)
    for a in range(0, 300, 17):
        m = np.empty((len(x[a:a + 17]), 6), np.float32)
        s.update(x[a:a + 17], maxima_out=m)
        assert np.array_equal(m, x[a:a + 17].reshape(len(m), 6, -1).max(axis=2)), (h, w)
    ref = np.quantile(np.moveaxis(x, 1, 0).reshape(6, -1).astype(np.float64), 0.9, axis=1)
    assert np.array_equal(s.thresholds(), ref), (h, w)
bad = np.ones((4, 40, 3, 3), np.float32)
bad[2, 31, 1, 1] = np.inf
try:
    ndf.QuantileSketch(40, total=36, device="cpu").update(bad)
    raise SystemExit("no error for an infinite value")
except ValueError as e:
    assert "unit 31, batch position 2, map element 4" in str(e), e
print("ok", ndf.backends()["cpu"]["detail"])
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_quantile_scan_of_each_variant_equals_numpy(isa):
    env = dict(os.environ, NDF_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", QUANTILE_SCRIPT], env=env, check=True, capture_output=True,
                         text=True).stdout
    assert out.startswith("ok") and f"SIMD {isa}," in out
