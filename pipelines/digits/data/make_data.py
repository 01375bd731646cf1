"""Write the digits pipeline's bundled data from scikit-learn's digits (no download).

    python pipelines/digits/data/make_data.py

scikit-learn ships the 1,797 8x8 grey-level digit images (UCI "optdigits" test set) inside the
package. They are shuffled with a fixed seed and written as two CSV splits that CsvExampleGen
reads as they are: ``train/digits.csv`` (80 %) and ``eval/digits.csv`` (20 %). Each row has 64
integer pixel columns ``pixel_00`` … ``pixel_63`` (0–16, row-major) and the ``label`` (0–9).
The output is committed; rerunning this script reproduces it byte for byte.
"""
from __future__ import annotations

import csv
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PIXELS = [f"pixel_{i:02d}" for i in range(64)]
LABEL = "label"
EVAL_FRACTION = 0.2
SEED = 0


def write_split(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(PIXELS + [LABEL])
        for img, y in zip(images, labels):
            w.writerow([int(v) for v in img.reshape(-1)] + [int(y)])


def main(out_dir: str = HERE) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(SEED).permutation(len(digits.target))
    images, labels = digits.images[order].astype(np.int64), digits.target[order]
    n_eval = int(round(len(labels) * EVAL_FRACTION))
    splits = {"train": slice(n_eval, None), "eval": slice(0, n_eval)}
    counts = {}
    for name, sl in splits.items():
        write_split(os.path.join(out_dir, name, "digits.csv"), images[sl], labels[sl])
        counts[name] = len(labels[sl])
    return counts


if __name__ == "__main__":
    print(main())
