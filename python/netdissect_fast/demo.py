"""`netdissect-fast demo`: the whole method, offline, in about two minutes on 2 CPU cores.

1. generate a Broden-format world (`make_broden`, 2000 images): nine scenes told apart
   only by their objects (a street has a house and a car, a town only a house...), on
   backgrounds drawn independently of the scene;
2. train a small CNN to classify the SCENE of each image (it is never told about objects);
3. dissect its two last layers;
4. print unique detectors per category and, per object, the unit that detects it best
   (with its IoU, and the unit's own best label when that is a part or material).

Training augments with flips, random zooms, and colour-channel permutations / greyscale:
colour alone then no longer tells the scenes apart, so the network has to look at the
shapes of things (houses, cars, trees, people, the sun...). It pools its last layer with a
global max, so a unit only has to fire where the thing it looks for is.

Everything is seeded, so two runs print the same numbers (for the same torch build and
thread count).
"""
from __future__ import annotations

import csv
import json
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

DEFAULT_IMAGES = 2000
IMAGE_SIZE = 112
SEED = 0
EPOCHS = 12
THREADS = 2
LAYERS = ("features.conv4", "features.conv5")


def _scene_net(num_classes: int):
    from torch import nn

    def block(inp, out, stride):
        return nn.Sequential(nn.Conv2d(inp, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out),
                             nn.ReLU(inplace=True))

    class SceneNet(nn.Module):
        """Three stride-2 conv blocks (112 -> 14 px), two more at 14 px (receptive field
        67 px), global max pooling, a linear classifier."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(OrderedDict(
                conv1=block(3, 32, 2), conv2=block(32, 64, 2), conv3=block(64, 128, 2),
                conv4=block(128, 128, 1), conv5=block(128, 192, 1)))
            self.classifier = nn.Linear(192, num_classes)

        def forward(self, x):
            return self.classifier(self.features(x).amax((2, 3)))

    return SceneNet()


def _scene_targets(dataset) -> tuple[np.ndarray, list[str]]:
    """Per image, the index of its scene label; and the scene names."""
    scene_cat = dataset.categories.index("scene")
    batch = dataset.label_batch(np.arange(len(dataset)))
    scene_labels = sorted(int(n) for n in np.flatnonzero(dataset.primary_category == scene_cat))
    column = {n: i for i, n in enumerate(scene_labels)}
    targets = np.full(len(dataset), -1, np.int64)
    for i in range(len(dataset)):
        for n in batch.image_labels[batch.image_label_start[i]:batch.image_label_start[i + 1]]:
            if int(n) in column:
                targets[i] = column[int(n)]
    if (targets < 0).any():
        raise ValueError("demo: some images have no scene label")
    return targets, [dataset.label_names[n] for n in scene_labels]


def _train_rows(dataset) -> np.ndarray:
    """Boolean per dataset row: True for index.csv split 'train' (the rest is held out)."""
    split = {}
    with open(Path(dataset.path) / "index.csv", newline="") as f:
        for r in csv.DictReader(f):
            split[str(Path(dataset.path, "images", r["image"]).resolve())] = r["split"]
    return np.array([split.get(str(Path(p).resolve()), "train") == "train"
                     for p in dataset.image_paths])


def _load_images(dataset, mean, std):
    import torch
    from PIL import Image
    images = np.stack([np.array(Image.open(p).convert("RGB")) for p in dataset.image_paths])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


_PERMUTATIONS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


def _augment(xb, g):
    """Flips, colour-channel permutations, 20 % greyscale (per image) and one random
    zoom (60-100 % of the side, per batch)."""
    import torch
    B, _, H, W = xb.shape
    flip = torch.rand(B, generator=g) < 0.5
    xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
    perm = torch.tensor(_PERMUTATIONS)[torch.randint(len(_PERMUTATIONS), (B,), generator=g)]
    xb = torch.gather(xb, 1, perm.view(B, 3, 1, 1).expand_as(xb))
    grey = torch.rand(B, generator=g) < 0.2
    xb = torch.where(grey.view(-1, 1, 1, 1), xb.mean(1, keepdim=True).expand_as(xb), xb)
    side = int(H * (0.6 + 0.4 * float(torch.rand(1, generator=g))))
    if side < H:
        oy, ox = (int(v) for v in torch.randint(0, H - side + 1, (2,), generator=g))
        xb = torch.nn.functional.interpolate(xb[:, :, oy:oy + side, ox:ox + side], size=(H, W),
                                             mode="bilinear", align_corners=False)
    return xb


def _train(model, x, y, epochs: int, progress: bool) -> float:
    """SGD (one-cycle schedule) with augmentation; returns the last epoch's training accuracy."""
    import torch
    from tqdm.auto import tqdm
    g = torch.Generator().manual_seed(SEED)
    batch = 32
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=epochs * ((len(x) + batch - 1) // batch))
    model.train()
    accuracy = 0.0
    for epoch in tqdm(range(epochs), desc="training scene classifier", disable=not progress, leave=False):
        order = torch.randperm(len(x), generator=g)
        correct = 0
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            xb, yb = _augment(x[idx], g), y[idx]
            logits = model(xb)
            loss = torch.nn.functional.cross_entropy(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == yb).sum())
        accuracy = correct / len(x)
    model.eval()
    return accuracy


def _accuracy(model, x, y) -> float:
    import torch
    if len(x) == 0:
        return float("nan")
    with torch.inference_mode():
        pred = torch.cat([model(x[i:i + 200]).argmax(1) for i in range(0, len(x), 200)])
    return float((pred == y).float().mean())


def run_demo(out="netdissect-demo", n_images: int | None = None, epochs: int = EPOCHS,
             progress: bool = True) -> dict:
    """Run the demo, writing everything under `out`; returns {layer: DissectionResult}."""
    import torch
    from .broden import Broden
    from .datasets import make_broden
    from .dissect import dissect

    start = time.perf_counter()
    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    out = Path(out)
    n_images = n_images or DEFAULT_IMAGES
    data = out / "dataset"
    recipe = {"n": n_images, "seed": SEED, "size": IMAGE_SIZE}
    if _read_json(out / "dataset.json") != recipe:       # reuse the world of an earlier run
        print(f"generating {n_images} images ({IMAGE_SIZE} px) in {data}")
        make_broden(data, n_images, SEED, size=IMAGE_SIZE, overwrite=True, progress=progress)
        (out / "dataset.json").write_text(json.dumps(recipe))
    dataset = Broden(data)

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    targets, scenes = _scene_targets(dataset)
    train = _train_rows(dataset)
    x, y = _load_images(dataset, mean, std), torch.from_numpy(targets)
    tr, held = torch.from_numpy(np.flatnonzero(train)), torch.from_numpy(np.flatnonzero(~train))
    model = _scene_net(len(scenes))
    t = time.perf_counter()
    print(f"training a 5-layer CNN to classify {len(scenes)} scenes ({', '.join(scenes)}) on "
          f"{len(tr)} images for {epochs} epochs; it is never shown an object label")
    accuracy = _train(model, x[tr], y[tr], epochs, progress)
    print(f"  scene accuracy: {accuracy:.0%} on training images (augmented), "
          f"{_accuracy(model, x[held], y[held]):.0%} on {len(held)} held-out images "
          f"({time.perf_counter() - t:.0f} s)")
    del x

    print(f"dissecting {', '.join(LAYERS)} on all {len(dataset)} images")
    results = dissect(model, list(LAYERS), dataset, out / "results", model_name="scene_cnn",
                      batch_size=100, device="cpu", mean=mean, std=std, progress=progress,
                      workers=0)
    for layer, result in results.items():
        _print_layer(layer, result)
    print("\nreports: " + ", ".join(str(Path(r.meta['result_dir']) / 'report.html')
                                   for r in results.values()))
    print(f"demo finished in {time.perf_counter() - start:.0f} s; everything is in {out}")
    return results


def _print_layer(layer: str, result, iou_threshold: float = 0.04) -> None:
    """Unique detectors per category (each unit named by its single best label, as in the
    paper), then per object the unit whose mask matches it best (its object IoU) and how
    many units have that object as their best label."""
    from .cli import print_summary
    print()
    print_summary(layer, result, iou_threshold)
    obj = result.categories.index("object") if "object" in result.categories else -1
    iou = result.iou
    top, top_iou = result.best_labels()
    rows = []
    for lab in np.flatnonzero(result.primary_category == obj):
        unit = int(np.argmax(iou[:, lab]))
        if iou[unit, lab] > iou_threshold:
            rows.append((float(iou[unit, lab]), result.label_names[lab], unit,
                         int(((top == lab) & (top_iou > iou_threshold)).sum())))
    if not rows:
        print("  no object detectors")
        return
    print("  objects (the scene classifier was never told about them): best unit, its IoU with the "
          "object, units labelled with it")
    for value, name, unit, n in sorted(rows, reverse=True):
        own = "" if int(top[unit]) == result.label_names.index(name) else \
            f"   (unit {unit}'s best label: {result.label_names[int(top[unit])]}, IoU {top_iou[unit]:.3f})"
        print(f"    {name:<10} unit {unit:4d}  IoU {value:.3f}   {n:2d} unit{'s' * (n != 1)}{own}")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
