"""Receptive-field centres read off a model (netdissect_fast.receptive), checked on
networks whose geometry is known by hand, and used by dissect()."""
import numpy as np
import pytest
import torch
from torch import nn

import netdissect_fast as ndf
from netdissect_fast import receptive
from netdissect_fast.dissect import Layer, _Capture, dissect, iter_activations


def estimate(model, name, size):
    layer = Layer(name, module=name)
    cap = _Capture(model, [layer])
    try:
        return receptive.estimate(model.eval(), cap, name, size, "cpu")
    finally:
        cap.close()


def test_two_stride2_convs_put_unit_i_at_4i():
    torch.manual_seed(0)
    # conv k3 s2 p1: unit j of layer 1 is centred on input pixel 2j; layer 2 unit i on 4i.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 4, 3, 2, 1))
    (sy, sx), (oy, ox) = estimate(model, "2", (48, 40))
    assert (sy, sx, oy, ox) == (4.0, 4.0, 0.0, 0.0)


def test_unpadded_conv_shifts_the_offset():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 5, 1, 0), nn.ReLU(), nn.Conv2d(4, 4, 2, 2, 0))
    # layer 1 unit j covers input j..j+4 (centre j+2); layer 2 unit i covers layer-1 2i, 2i+1
    (sy, sx), (oy, ox) = estimate(model, "2", (40, 40))
    assert (sy, sx) == (2.0, 2.0) and (oy, ox) == (2.5, 2.5)


def test_fields_larger_than_the_image_fall_back_to_evenly_spread_units():
    model = nn.Sequential(*[nn.Conv2d(3 if i == 0 else 4, 4, 3, 1, 1) for i in range(12)])
    (sy, sx), (oy, ox) = estimate(model, "11", (16, 16))  # field 25 px > 16 px image
    assert (sy, sx, oy, ox) == (1.0, 1.0, 0.0, 0.0)


def test_to_segmentation_maps_pixel_centres():
    # image pixel u <-> segmentation (u + 0.5) * r - 0.5 with r = 1/2
    (s, _), (o, _) = receptive.to_segmentation(((4.0, 4.0), (0.0, 0.0)), (48, 48), (24, 24))
    assert s == 2.0 and o == -0.25


def test_dissect_uses_the_model_receptive_field(tmp_path):
    ds_path = tmp_path / "data"
    ndf.datasets.make_broden(ds_path, 16, seed=4, size=32, workers=1)
    ds = ndf.Broden(ds_path)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.ReLU(), nn.Conv2d(6, 5, 3, 2, 1), nn.ReLU())
    kw = dict(batch_size=8, workers=0, progress=False, device="cpu", report=False, cache="none")
    res = dissect(model, ["2"], ds, tmp_path / "out", upsample="receptive_field", **kw)["2"]
    rf = ((2.0, 2.0), (-0.25, -0.25))  # stride 4 px, offset 0 px, at 16/32 segmentation scale
    acts = np.concatenate([m["2"].numpy() for _, _, m in
                           iter_activations(model, ["2"], ds, batch_size=8, device="cpu", workers=0)])
    ref = ndf.score(acts, ds, upsample="receptive_field", receptive_field=rf, progress=False, top_n=0)
    np.testing.assert_array_equal(res.intersection, ref.intersection)
    np.testing.assert_array_equal(res.cat_activation, ref.cat_activation)
    explicit = dissect(model, ["2"], ds, tmp_path / "out", upsample="receptive_field",
                       receptive_field=(2.0, -0.25), **kw)["2"]
    np.testing.assert_array_equal(explicit.intersection, ref.intersection)


def test_cli_receptive_field_argument():
    from netdissect_fast.cli import _receptive_field_arg
    assert _receptive_field_arg("16,7.5") == (16.0, 7.5)
    assert _receptive_field_arg(None) is None
    with pytest.raises(ValueError, match="STRIDE,OFFSET"):
        _receptive_field_arg("16")
    with pytest.raises(ValueError, match="positive"):
        _receptive_field_arg("0,1")
