"""The CUDA backend on a real GPU: the same exact comparisons with the CPU
backend. Skipped, with the reason, where no CUDA device is usable."""
import numpy as np
import pytest

import netdissect_fast as ndf
from netdissect_fast.tally import Tally
from synthetic import random_dataset, smooth_activations

_cuda = ndf.backends()["cuda"]
pytestmark = [pytest.mark.requires_cuda,
              pytest.mark.skipif(not _cuda["usable"], reason=f"CUDA backend: {_cuda['detail']}")]


def test_quantile_on_cuda_tensors_equals_cpu():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(31)
    x = smooth_activations(rng, 200, 64, 7, 7)
    cpu = ndf.QuantileSketch(64, total=200 * 49, device="cpu")
    gpu = ndf.QuantileSketch(64, total=200 * 49, device="cuda")
    xt = torch.from_numpy(x).cuda()
    for s in range(0, 200, 64):
        cpu.update(x[s:s + 64])
        gpu.update(xt[s:s + 64])
    np.testing.assert_array_equal(gpu.thresholds(), cpu.thresholds())


@pytest.mark.parametrize("rule", ["paper", "netdissect-lite"])
def test_tally_on_cuda_equals_cpu(rule):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(32)
    ds = random_dataset(rng, n_images=16)
    acts = smooth_activations(rng, 16, 32, 7, 7)
    thr = np.quantile(np.moveaxis(acts, 1, 0).reshape(32, -1).astype(np.float64), 0.99, axis=1)
    cpu = Tally(ds, thr, rule=rule, device="cpu").update(acts, np.arange(16))
    gpu = Tally(ds, thr, rule=rule, device="cuda").update(torch.from_numpy(acts).cuda(), np.arange(16))
    np.testing.assert_array_equal(gpu.intersection, cpu.intersection)
    np.testing.assert_array_equal(gpu.cat_activation, cpu.cat_activation)
    np.testing.assert_array_equal(gpu.label_pixels, cpu.label_pixels)
