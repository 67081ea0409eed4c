"""End-to-end dissection of tiny models on a tiny generated dataset, checked against
`ndf.score` on the same activations (exact counts), plus resume and cache validity."""
from collections import OrderedDict

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import netdissect_fast as ndf
from netdissect_fast.dissect import _FAIL_ENV, _as_maps, dissect, iter_activations

N_IMAGES, SIZE, BATCH = 40, 32, 8           # 5 batches


class TinyNet(nn.Module):
    """32 px -> stem 16x16 (6 units) -> block.conv 8x8 (5 units)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.ReLU())
        self.block = nn.Sequential(OrderedDict(conv=nn.Conv2d(6, 5, 3, 2, 1), act=nn.ReLU()))

    def forward(self, x):
        return self.block(self.stem(x)).mean((2, 3))


class TinyViT(nn.Module):
    """Patchify 32 px into a 4x4 grid, prepend a class token: blocks.0 gives (B, 17, 7)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.patch = nn.Conv2d(3, 7, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 7))
        self.blocks = nn.Sequential(nn.Linear(7, 7))

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1)
        return self.blocks(tokens)[:, 0]


def count_forwards(model):
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny"
    ndf.datasets.make_broden(path, N_IMAGES, seed=3, size=SIZE, workers=1)
    return ndf.Broden(path)


def run(model, layers, ds, out, **kw):
    kw = dict(dict(batch_size=BATCH, workers=0, progress=False, device="cpu", report=False), **kw)
    return dissect(model, layers, ds, out, **kw)


def reference(model, layers, ds, dtype=np.float16):
    """Each layer's activations for the whole dataset, run outside `dissect`, then scored."""
    acts = {}
    for _, _, maps in iter_activations(model, layers, ds, batch_size=16, device="cpu", workers=0):
        for name, m in maps.items():
            acts.setdefault(name, []).append(m.numpy().astype(dtype))
    return {name: ndf.score(np.concatenate(a).astype(np.float32), ds, progress=False)
            for name, a in acts.items()}


def assert_same_counts(result, ref):
    np.testing.assert_array_equal(result.thresholds, ref.thresholds)
    np.testing.assert_array_equal(result.intersection, ref.intersection)
    np.testing.assert_array_equal(result.cat_activation, ref.cat_activation)
    np.testing.assert_array_equal(result.label_pixels, ref.label_pixels)
    assert result.top is not None and ref.top is not None
    np.testing.assert_array_equal(result.top.indices, ref.top.indices)


def test_matches_score_with_float16_cache_and_nested_hooks(ds, tmp_path):
    model = TinyNet()
    calls = count_forwards(model)
    results = run(model, ["stem", "block.conv"], ds, tmp_path, keep_cache=True)
    assert calls[0] == N_IMAGES // BATCH                # both layers from the same single pass
    ref = reference(model, ["stem", "block.conv"], ds, np.float16)
    for name in ("stem", "block.conv"):
        assert_same_counts(results[name], ref[name])
        d = tmp_path / "TinyNet" / name
        [layer_dir] = d.iterdir()                        # .../<settings-hash>
        for f in ("done", "results.npz", "tally.csv", "summary.json", "settings.json",
                  "activations.h5"):
            assert (layer_dir / f).is_file(), f
        assert not (layer_dir / "checkpoint.pkl").exists()
        with h5py.File(layer_dir / "activations.h5") as f:
            assert f["activations"].dtype == np.float16 and f.attrs["rows_done"] == N_IMAGES
            assert f["activations"].chunks[0] == BATCH
    assert results["block.conv"].intersection.shape[0] == 5
    assert results["block.conv"].meta["map_shape"] == [8, 8]


def test_no_cache_runs_model_twice_in_float32(ds, tmp_path):
    model = TinyNet()
    calls = count_forwards(model)
    results = run(model, ["block.conv"], ds, tmp_path, cache="none")
    assert calls[0] == 2 * N_IMAGES // BATCH
    assert_same_counts(results["block.conv"], reference(model, ["block.conv"], ds, np.float32)["block.conv"])
    [layer_dir] = (tmp_path / "TinyNet" / "block.conv").iterdir()
    assert not (layer_dir / "activations.h5").exists()


def test_vit_tokens_on_patch_grid(ds, tmp_path):
    model = TinyViT()
    raw = []
    model.blocks[0].register_forward_hook(lambda m, i, o: raw.append(o.detach()))
    result = run(model, ["blocks.0"], ds, tmp_path, cache="none")["blocks.0"]
    tokens = torch.cat(raw[: N_IMAGES // BATCH])          # pass 1's outputs, (N, 17, 7)
    assert tokens.shape == (N_IMAGES, 17, 7)
    maps = tokens[:, 1:].transpose(1, 2).reshape(N_IMAGES, 7, 4, 4).numpy()
    assert_same_counts(result, ndf.score(maps, ds, progress=False))


def test_as_maps_shapes():
    assert _as_maps(torch.zeros(2, 16, 3), "x").shape == (2, 3, 4, 4)     # no class token
    assert _as_maps(torch.zeros(2, 5), "x").shape == (2, 5, 1, 1)
    assert _as_maps((torch.zeros(2, 3, 4, 4),), "x").shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="layer 'odd'.*15 tokens"):
        _as_maps(torch.zeros(2, 15, 3), "odd")


def test_callable_and_output_layers(ds, tmp_path):
    model = TinyNet()
    results = run(model, [("double_stem", lambda out: 2 * out["stem"], ["stem"]), "@output"],
                  ds, tmp_path, cache="none")
    plain = run(model, ["stem"], ds, tmp_path / "plain", cache="none")["stem"]
    np.testing.assert_array_equal(results["double_stem"].thresholds, 2 * plain.thresholds)
    np.testing.assert_array_equal(results["double_stem"].intersection, plain.intersection)
    assert results["@output"].meta["map_shape"] == [1, 1]


def test_unknown_layer_lists_close_matches(ds, tmp_path):
    with pytest.raises(ValueError, match=r"'block\.cnv'.*close matches: block\.conv"):
        run(TinyNet(), ["block.cnv"], ds, tmp_path)
    with pytest.raises(ValueError, match="top-level modules: stem, block"):
        run(TinyNet(), ["zzz"], ds, tmp_path)


def test_bad_arguments(ds, tmp_path):
    with pytest.raises(ValueError, match="cache"):
        run(TinyNet(), ["stem"], ds, tmp_path, cache="yes")
    with pytest.raises(ValueError, match="q must"):
        run(TinyNet(), ["stem"], ds, tmp_path, q=1.5)
    with pytest.raises(TypeError, match="layers\\[0\\]"):
        run(TinyNet(), [3], ds, tmp_path)


def test_resume_after_kill_in_pass1_with_cache(ds, tmp_path, monkeypatch):
    expected = run(TinyNet(), ["stem", "block.conv"], ds, tmp_path / "once")
    monkeypatch.setenv(_FAIL_ENV, "3")                   # dies after 3 of 5 forward batches
    with pytest.raises(RuntimeError, match="simulated failure"):
        run(TinyNet(), ["stem", "block.conv"], ds, tmp_path / "killed", checkpoint_every=2)
    monkeypatch.delenv(_FAIL_ENV)
    model = TinyNet()
    calls = count_forwards(model)
    results = run(model, ["stem", "block.conv"], ds, tmp_path / "killed", checkpoint_every=2)
    assert calls[0] == 2        # batch 3 (after the checkpoint) comes back from the cache
    for name in results:
        assert_same_counts(results[name], expected[name])
    calls[0] = 0
    again = run(model, ["stem", "block.conv"], ds, tmp_path / "killed")
    assert calls[0] == 0                                  # finished: loaded, not recomputed
    assert_same_counts(again["stem"], expected["stem"])


def test_resume_after_kill_in_pass2(ds, tmp_path, monkeypatch):
    expected = run(TinyNet(), ["block.conv"], ds, tmp_path / "once")
    monkeypatch.setenv(_FAIL_ENV, "7")                   # 5 pass-1 batches, then 2 of pass 2
    with pytest.raises(RuntimeError, match="simulated failure"):
        run(TinyNet(), ["block.conv"], ds, tmp_path / "killed", checkpoint_every=1)
    monkeypatch.delenv(_FAIL_ENV)
    model = TinyNet()
    calls = count_forwards(model)
    results = run(model, ["block.conv"], ds, tmp_path / "killed")
    assert calls[0] == 0
    assert_same_counts(results["block.conv"], expected["block.conv"])


def test_resume_without_cache_recomputes_no_finished_batch(ds, tmp_path):
    expected = run(TinyNet(), ["block.conv"], ds, tmp_path / "once", cache="none")
    model = TinyNet()
    calls = count_forwards(model)

    def die_on_third_batch(module, inputs):
        if calls[0] == 3:
            raise KeyboardInterrupt                      # like Ctrl-C mid-run
    handle = model.register_forward_pre_hook(die_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run(model, ["block.conv"], ds, tmp_path / "killed", cache="none", checkpoint_every=1)
    handle.remove()
    calls[0] = 0
    results = run(model, ["block.conv"], ds, tmp_path / "killed", cache="none", checkpoint_every=1)
    assert calls[0] == 3 + 5     # batches 3-5 of pass 1, then all of pass 2
    assert_same_counts(results["block.conv"], expected["block.conv"])


def test_changed_weights_invalidate_results_and_cache(ds, tmp_path):
    model = TinyNet()
    first = run(model, ["block.conv"], ds, tmp_path)["block.conv"]
    with torch.no_grad():
        model.block.conv.weight[0, 0, 0, 0] += 0.5
    calls = count_forwards(model)
    second = run(model, ["block.conv"], ds, tmp_path)["block.conv"]
    assert calls[0] == N_IMAGES // BATCH
    assert first.meta["result_dir"] != second.meta["result_dir"]
    assert not np.array_equal(first.thresholds, second.thresholds)


def test_tampered_cache_is_not_trusted(ds, tmp_path, monkeypatch):
    monkeypatch.setenv(_FAIL_ENV, "4")
    with pytest.raises(RuntimeError):
        run(TinyNet(), ["stem"], ds, tmp_path, checkpoint_every=2)
    monkeypatch.delenv(_FAIL_ENV)
    [cache] = tmp_path.rglob("activations.h5")
    with h5py.File(cache, "r+") as f:
        f.attrs["fingerprint"] = "someone else's"
    model = TinyNet()
    calls = count_forwards(model)
    result = run(model, ["stem"], ds, tmp_path)["stem"]
    assert calls[0] == N_IMAGES // BATCH                 # started over
    assert_same_counts(result, run(TinyNet(), ["stem"], ds, tmp_path / "fresh")["stem"])


def test_settings_change_goes_to_another_directory(ds, tmp_path):
    a = run(TinyNet(), ["stem"], ds, tmp_path)["stem"]
    b = run(TinyNet(), ["stem"], ds, tmp_path, q=0.99)["stem"]
    assert a.meta["result_dir"] != b.meta["result_dir"]
    assert (b.thresholds <= a.thresholds).all()
