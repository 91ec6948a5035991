"""A FEMNIST-like federated dataset in LEAF's JSON format, made from scikit-learn's digits.

FEMNIST (Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings") partitions handwritten
characters by writer, so each client has its own handwriting and its own mix of labels. This script
imitates that with the 1,797 8x8 UCI digits (Alpaydin & Kaynak 1998, ``sklearn.datasets.load_digits``):
each image is upsampled to 24x24 and padded to 28x28 (EMNIST's size), values in [0, 1] (ink = 1), and
writer ``w`` draws everything from ``generator(seed, "data", 0, w)``:

- a handwriting: rotation (+-18 degrees), shear (+-0.35), scale (0.8-1.15), stroke thickness (thin, normal
  or bold), contrast (0.55-1.0) and pixel noise, applied to every digit it writes;
- a skewed label distribution, Dirichlet(``--alpha`` = 0.5) over the 10 digits;
- a number of samples, log-normal with median ``--median-samples`` (60), at least 12.

Each writer's samples are split 90/10 into train/ and test/ (at least one test sample), like LEAF's
``preprocess.sh -t sample --tf 0.9``; files hold up to 100 writers each.

    python -m benchmarks.femnist_like --out data/femnist_like --writers 300 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from simulator.rng import generator

SIZE = 28
WRITERS_PER_FILE = 100


def digit_pool() -> list[np.ndarray]:
    """The digits as 28x28 float images in [0, 1], grouped by label."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = np.stack([np.pad(ndimage.zoom(img.reshape(8, 8) / 16.0, 3.0, order=1), 2) for img in x])
    return [np.clip(images[y == k], 0.0, 1.0) for k in range(10)]


def writer_style(rng: np.random.Generator) -> dict[str, float]:
    return {"angle": rng.uniform(-18, 18), "shear": rng.uniform(-0.35, 0.35), "scale": rng.uniform(0.8, 1.15),
            "thickness": float(rng.integers(-1, 2)), "contrast": rng.uniform(0.55, 1.0), "noise": rng.uniform(0, 0.06)}


def write(image: np.ndarray, style: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    """``image`` as written by a writer of this style: an affine stroke transform, thickness, contrast, noise."""
    a = math.radians(style["angle"] + rng.normal(0, 3))
    rotate = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    matrix = rotate @ np.array([[1.0, style["shear"]], [0.0, 1.0]]) / style["scale"]
    center = np.array([SIZE / 2 - 0.5, SIZE / 2 - 0.5])
    out = ndimage.affine_transform(image, matrix, offset=center - matrix @ center, order=1)
    if style["thickness"] > 0:
        out = ndimage.grey_dilation(out, size=(2, 2))
    elif style["thickness"] < 0:
        out = np.clip(out - 0.25, 0.0, None) / 0.75
    out = out * style["contrast"] + rng.normal(0.0, style["noise"], out.shape)
    return np.clip(out, 0.0, 1.0)


def make_writer(w: int, seed: int, pool: list[np.ndarray], alpha: float, median: float) -> tuple[list, list]:
    """Writer ``w``'s flattened images and labels."""
    rng = generator(seed, "data", 0, w)
    style = writer_style(rng)
    probs = rng.dirichlet(np.full(10, alpha))
    n = max(12, int(rng.lognormal(math.log(median), 0.6)))
    labels = rng.choice(10, size=n, p=probs)
    xs = [write(pool[k][rng.integers(len(pool[k]))], style, rng) for k in labels]
    return [np.round(x.reshape(-1), 3).tolist() for x in xs], labels.tolist()


def build(out: Path, writers: int, seed: int, alpha: float = 0.5, median: float = 60.0,
          train_fraction: float = 0.9) -> dict[str, int]:
    """Write ``out/train/*.json`` and ``out/test/*.json``; returns the sample counts."""
    pool = digit_pool()
    for split in ("train", "test"):
        (out / split).mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "test": 0}
    for first in range(0, writers, WRITERS_PER_FILE):
        files: dict[str, dict] = {s: {"users": [], "num_samples": [], "user_data": {}} for s in counts}
        for w in range(first, min(first + WRITERS_PER_FILE, writers)):
            x, y = make_writer(w, seed, pool, alpha, median)
            k = min(max(1, round(len(y) * train_fraction)), len(y) - 1)
            user = f"f{w:04d}_{seed:02d}"
            for split, part in (("train", slice(0, k)), ("test", slice(k, None))):
                files[split]["users"].append(user)
                files[split]["num_samples"].append(len(y[part]))
                files[split]["user_data"][user] = {"x": x[part], "y": y[part]}
                counts[split] += len(y[part])
        for split, data in files.items():
            name = f"all_data_{first // WRITERS_PER_FILE}_niid_0_keep_0_{split}_9.json"
            (out / split / name).write_text(json.dumps(data, separators=(",", ":")))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/femnist_like", help="directory to write train/ and test/ into")
    parser.add_argument("--writers", type=int, default=300, help="writers (clients)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of writers' labels")
    parser.add_argument("--median-samples", type=float, default=60.0, help="median samples per writer")
    args = parser.parse_args(argv)
    counts = build(Path(args.out), args.writers, args.seed, args.alpha, args.median_samples)
    print(f"{args.writers} writers, {counts['train']} train and {counts['test']} test samples in {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
