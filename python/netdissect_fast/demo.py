"""`netdissect-fast demo`: the whole method, offline, in a few minutes on a laptop CPU.

1. generate a small Broden-format world (`make_broden`): scenes made of objects;
2. train a small CNN to classify the SCENE of each image (it is never told about objects);
3. dissect two of its layers;
4. print unique detectors per category and the units that became object detectors.

Everything is seeded, so two runs print the same numbers.
"""
from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

DEFAULT_IMAGES = 800
IMAGE_SIZE = 112
SEED = 0
LAYERS = ("features.conv3", "features.conv4")


def _scene_net(num_classes: int):
    from torch import nn

    def block(inp, out):
        return nn.Sequential(nn.Conv2d(inp, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out),
                             nn.ReLU(inplace=True))

    class SceneNet(nn.Module):
        """Four stride-2 conv blocks (112 -> 7 px), global pooling, a linear classifier."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(OrderedDict(
                conv1=block(3, 32), conv2=block(32, 64), conv3=block(64, 96), conv4=block(96, 128)))
            self.classifier = nn.Linear(128, num_classes)

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))

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


def _load_images(dataset, mean, std):
    import torch
    from PIL import Image
    images = np.stack([np.array(Image.open(p).convert("RGB")) for p in dataset.image_paths])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _train(model, x, y, epochs: int, progress: bool) -> float:
    """Plain SGD with flips; returns the training accuracy of the last epoch."""
    import torch
    from tqdm.auto import tqdm
    g = torch.Generator().manual_seed(SEED)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=epochs * ((len(x) + 31) // 32))
    model.train()
    accuracy = 0.0
    for epoch in tqdm(range(epochs), desc="training scene classifier", disable=not progress, leave=False):
        order = torch.randperm(len(x), generator=g)
        correct = 0
        for start in range(0, len(x), 32):
            idx = order[start:start + 32]
            xb, yb = x[idx], y[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
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


def run_demo(out="netdissect-demo", n_images: int | None = None, epochs: int = 8,
             progress: bool = True) -> dict:
    """Run the demo, writing everything under `out`; returns {layer: DissectionResult}."""
    import torch
    from .broden import Broden
    from .datasets import make_broden
    from .dissect import dissect

    start = time.perf_counter()
    torch.manual_seed(SEED)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
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
    model = _scene_net(len(scenes))
    print(f"training a 4-layer CNN to classify {len(scenes)} scenes ({', '.join(scenes)}) "
          f"for {epochs} epochs")
    accuracy = _train(model, _load_images(dataset, mean, std), torch.from_numpy(targets),
                      epochs, progress)
    print(f"  training accuracy {accuracy:.0%}")

    print(f"dissecting {', '.join(LAYERS)}")
    results = dissect(model, list(LAYERS), dataset, out / "results", model_name="scene_cnn",
                      batch_size=100, device="cpu", mean=mean, std=std, progress=progress,
                      workers=0)
    for layer, result in results.items():
        _print_layer(layer, result)
    print(f"\nreports: " + ", ".join(str(Path(r.meta['result_dir']) / 'report.html')
                                    for r in results.values()))
    print(f"demo finished in {time.perf_counter() - start:.0f} s; everything is in {out}")
    return results


def _print_layer(layer: str, result, iou_threshold: float = 0.04) -> None:
    from .cli import print_summary
    print()
    print_summary(layer, result, iou_threshold)
    rows = [r for r in result.table()
            if r["category"] == "object" and r["iou"] > iou_threshold]
    rows.sort(key=lambda r: -r["iou"])
    if not rows:
        print("  no object detectors")
    for r in rows[:10]:
        print(f"  unit {r['unit']:4d} detects object {r['label_name']!r:14} IoU {r['iou']:.3f}")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
