"""Where a layer's units sit in the image, for ``upsample="receptive_field"``
(SPEC §2: unit (i, j) at (o + s·i, o + s·j)).

The centre of a unit's receptive field is read off the model itself: the input
pixels that can change the unit's activation are exactly where the gradient of
that activation with respect to the input is non-zero, and the middle of that
region is the centre. Two neighbouring units give the stride. Where a receptive
field reaches past the image border (deep layers), the region is clipped and its
middle is not the centre: then the layer's units are taken to be evenly spread
(stride = image size / map size, centred in their cells), which is what the
paper's arithmetic gives for same-padded networks."""
from __future__ import annotations

import warnings

import torch


def _support_box(grad: torch.Tensor):
    """(y0, y1, x0, x1) of the non-zero region of a (B, C, H, W) gradient, or None."""
    mask = grad.abs().sum(dim=(0, 1)) > 0
    ys = mask.any(dim=1).nonzero().flatten()
    xs = mask.any(dim=0).nonzero().flatten()
    if ys.numel() == 0 or xs.numel() == 0:
        return None
    return int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())


def estimate(model: torch.nn.Module, capture, layer_name: str, image_size, device) -> tuple:
    """((stride_y, stride_x), (offset_y, offset_x)) in image pixels (pixel p at
    coordinate p). ``capture(x)`` runs the model and returns {layer: (B, K, h, w)}."""
    H, W = image_size
    torch.manual_seed(0)
    x = torch.randn(2, 3, H, W, device=device, requires_grad=True)
    with torch.enable_grad():
        act = capture(x)[layer_name]
        _, _, h, w = act.shape
        fallback = ((H / h, W / w), (H / h / 2 - 0.5, W / w / 2 - 0.5))
        centres = {}
        for i, j in {(h // 2, w // 2), (min(h // 2 + 1, h - 1), min(w // 2 + 1, w - 1))}:
            (g,) = torch.autograd.grad(act[:, :, i, j].abs().sum(), x, retain_graph=True)
            box = _support_box(g)
            if box is None or box[0] == 0 or box[2] == 0 or box[1] == H - 1 or box[3] == W - 1:
                return fallback  # no gradient, or the field is clipped by the border
            centres[(i, j)] = ((box[0] + box[1]) / 2, (box[2] + box[3]) / 2)
    (i0, j0) = (h // 2, w // 2)
    (cy0, cx0) = centres[(i0, j0)]
    i1, j1 = min(i0 + 1, h - 1), min(j0 + 1, w - 1)
    cy1, cx1 = centres[(i1, j1)]
    sy = (cy1 - cy0) / (i1 - i0) if i1 != i0 else H / h
    sx = (cx1 - cx0) / (j1 - j0) if j1 != j0 else W / w
    if sy <= 0 or sx <= 0:
        warnings.warn(f"layer {layer_name!r}: could not read a stride off the model; "
                      "using evenly spread units", RuntimeWarning, stacklevel=2)
        return fallback
    return (sy, sx), (cy0 - sy * i0, cx0 - sx * j0)


def to_segmentation(rf, image_size, seg_shape) -> tuple:
    """Image-pixel (stride, offset) -> segmentation pixels: image coordinate u is
    segmentation coordinate (u + 1/2)·(sh/H) - 1/2."""
    (sy, sx), (oy, ox) = rf
    ry, rx = seg_shape[0] / image_size[0], seg_shape[1] / image_size[1]
    return ((sy * ry, sx * rx), ((oy + 0.5) * ry - 0.5, (ox + 0.5) * rx - 0.5))
