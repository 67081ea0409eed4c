"""The CUDA kernels' own source, compiled as C++ (module _cuda_emu, see
csrc/cuda_emulation/cuda_emulation.h), must give exactly the CPU backend's
results. This is how CUDA code is exercised on machines without a GPU."""
import numpy as np
import pytest

import netdissect_fast as ndf
from netdissect_fast.tally import Tally
from synthetic import random_dataset, smooth_activations

EMU = "cuda-emulated"


def test_emulated_backend_is_built():
    from netdissect_fast import _backend
    mod = _backend.kernels(EMU)
    assert mod.emulated is True
    assert mod.device_count()[0] == 1


@pytest.mark.parametrize("q", [0.995, 0.9])
def test_quantile_equals_cpu(q):
    rng = np.random.default_rng(21)
    x = smooth_activations(rng, 40, 6, 7, 7)
    total = 40 * 49
    cpu = ndf.QuantileSketch(6, q=q, total=total, device="cpu")
    emu = ndf.QuantileSketch(6, q=q, total=total, device=EMU)
    m_cpu = np.empty((8, 6), np.float32)
    m_emu = np.empty((8, 6), np.float32)
    for s in range(0, 40, 8):
        cpu.update(x[s:s + 8], maxima_out=m_cpu)
        emu.update(x[s:s + 8], maxima_out=m_emu)
        np.testing.assert_array_equal(m_cpu, m_emu)
    np.testing.assert_array_equal(emu.thresholds(), cpu.thresholds())
    ref = np.quantile(np.moveaxis(x, 1, 0).reshape(6, -1).astype(np.float64), q, axis=1)
    np.testing.assert_array_equal(emu.thresholds(), ref)


def test_quantile_compaction_ties_and_merge():
    """Enough values that the device buffers compact many times; heavy ties make
    the radix select and the ordered compaction keep exact multiplicities."""
    rng = np.random.default_rng(22)
    x = np.round(rng.standard_normal((300, 3, 8, 8)) * 3).astype(np.float32)  # 19200 values/unit
    total = x.shape[0] * 64
    ref = np.quantile(np.moveaxis(x, 1, 0).reshape(3, -1).astype(np.float64), [0.995, 0.9], axis=1)
    a = ndf.QuantileSketch(3, q=0.9, total=total, device=EMU)
    b = ndf.QuantileSketch(3, q=0.9, total=total, device=EMU)
    for s in range(0, 150, 50):
        a.update(x[s:s + 50])
    for s in range(150, 300, 50):
        b.update(x[s:s + 50])
    a.merge(b)
    np.testing.assert_array_equal(a.quantiles([0.995, 0.9]), ref)
    restored = ndf.QuantileSketch.from_bytes(a.to_bytes(), device="cpu")
    np.testing.assert_array_equal(restored.quantiles([0.995, 0.9]), ref)


def test_quantile_non_finite_is_reported():
    x = np.zeros((3, 2, 2, 2), np.float32)
    x[1, 1, 0, 1] = np.nan
    with pytest.raises(ValueError, match="unit 1, batch position 1, map element 1"):
        ndf.QuantileSketch(2, total=12, device=EMU).update(x)


@pytest.mark.parametrize("rule", ["paper", "netdissect-lite"])
@pytest.mark.parametrize("map_shape,seg_shape", [((7, 7), (112, 112)), ((13, 13), (113, 113)), ((3, 5), (40, 57))])
def test_tally_equals_cpu(rule, map_shape, seg_shape):
    rng = np.random.default_rng(23)
    ds = random_dataset(rng, n_images=5, seg_shape=seg_shape, block=8)
    acts = smooth_activations(rng, 5, 4, *map_shape)
    flat = np.moveaxis(acts, 1, 0).reshape(4, -1).astype(np.float64)
    thr = np.quantile(flat, 0.98, axis=1, method="lower")
    results = []
    for dev in ("cpu", EMU):
        t = Tally(ds, thr, rule=rule, device=dev)
        t.update(acts[:3], np.arange(3)).update(acts[3:], np.arange(3, 5))
        results.append(t)
    for name in ("intersection", "cat_activation", "label_pixels"):
        np.testing.assert_array_equal(getattr(results[1], name), getattr(results[0], name))
    assert results[0].intersection.sum() > 0


def test_tally_receptive_field_and_half_precision_equal_cpu():
    rng = np.random.default_rng(24)
    ds = random_dataset(rng, n_images=4)
    acts = smooth_activations(rng, 4, 3, 7, 7).astype(np.float16)
    thr = np.quantile(np.moveaxis(acts, 1, 0).reshape(3, -1).astype(np.float64), 0.97, axis=1)
    kw = dict(upsample="receptive_field", receptive_field=(16.0, 7.5))
    cpu = Tally(ds, thr, device="cpu", **kw).update(acts, np.arange(4))
    emu = Tally(ds, thr, device=EMU, **kw).update(acts, np.arange(4))
    np.testing.assert_array_equal(emu.intersection, cpu.intersection)
    np.testing.assert_array_equal(emu.cat_activation, cpu.cat_activation)


def test_tally_non_finite_names_unit():
    rng = np.random.default_rng(25)
    ds = random_dataset(rng, n_images=3)
    acts = smooth_activations(rng, 3, 3, 7, 7)
    acts[1, 2, 0, 0] = -np.inf
    with pytest.raises(ValueError, match="unit 2, batch position 1"):
        Tally(ds, [0.5, 0.5, 0.5], device=EMU).update(acts, np.arange(3))


@pytest.mark.parametrize("device", ["cpu", "cpu-slots", EMU])
def test_pixel_set_id_outside_the_image_sets_is_named(device, monkeypatch):
    """A pixel whose set id is not one of its image's sets: the batch position and
    the id are named, nothing is counted, on the CPU (where the slot counter
    checks the ids while it builds its windows) and with the CUDA source."""
    if device == "cpu-slots":
        monkeypatch.setenv("NDF_SLOT_MIN_UNITS", "0")
        device = "cpu"
    rng = np.random.default_rng(26)
    # Few labels: each image has at most 64 (label, plane) slots, as the slot counter needs.
    ds = random_dataset(rng, n_images=4, empty_images=False, num_labels=12)
    acts = smooth_activations(rng, 4, 3, 7, 7)
    lb = ds.label_batch(np.arange(4))
    nsets = int(lb.set_start[3] - lb.set_start[2])
    lb.pixel_sets = lb.pixel_sets.copy()
    lb.pixel_sets[2, 50, 7] = nsets + 3
    lb.pixel_sets[2, 50, 90] = nsets + 9      # the row's last offender is the one named
    t = Tally(ds, [0.1, 0.1, 0.1], device=device)
    with pytest.raises(ValueError, match=rf"batch position 2 .*pixel set id outside the image's sets \({nsets + 9}\)"):
        t.update(acts, np.arange(4), labels=lb)
    assert t.intersection.sum() == 0
