"""Built-in data sets that work offline: procedural ``shapes`` (with known attributes), Fashion-MNIST
(Debian's ``dataset-fashion-mnist`` files) and scikit-learn's bundled ``digits``.

``shapes`` draws one foreground shape on a soft background. Four binary attributes, each independent
and balanced: ``square`` (square vs circle), ``red`` (red vs blue), ``large`` (large vs small),
``left`` (centre in the left vs right half). Nuisance factors (exact size, position, hue, background
shade and gradient) vary continuously, so the stochastic code has something to carry. Every image is a
pure function of (seed, index): any worker can render any slice. :func:`shapes_oracle` reads the
attributes back from pixels, so generated images can be judged without the model's own classifier.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES_ATTRIBUTES: tuple[str, ...] = ("square", "red", "large", "left")
_SUPERSAMPLE = 4  # draw at 4x and downsample: antialiased edges


def shapes_attributes(index: int, seed: int = 0) -> dict[str, int]:
    """The four binary attributes of image ``index`` (cheap: no drawing)."""
    rng = np.random.default_rng([seed, index])
    bits = rng.integers(0, 2, size=4)
    return dict(zip(SHAPES_ATTRIBUTES, (int(b) for b in bits), strict=True))


def render_shape(index: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, dict[str, int]]:
    """Image ``index`` of the shapes set: ([size, size, 3] uint8 RGB, attributes)."""
    rng = np.random.default_rng([seed, index])
    square, red, large, left = (int(b) for b in rng.integers(0, 2, size=4))
    s = size * _SUPERSAMPLE
    # background: a light grey vertical gradient
    top, bottom = rng.uniform(150, 235), rng.uniform(150, 235)
    grad = np.linspace(top, bottom, s)[:, None, None] * np.ones((1, s, 3))
    img = Image.fromarray(grad.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    radius = s * (rng.uniform(0.26, 0.32) if large else rng.uniform(0.13, 0.17))
    # centre: left or right half, any height, shape fully inside the image
    margin = radius + 1
    cx = rng.uniform(margin, s / 2 - 0.06 * s) if left else rng.uniform(s / 2 + 0.06 * s, s - margin)
    cx = float(np.clip(cx, margin, s - margin))
    cy = rng.uniform(margin, s - margin)
    strong, weak = rng.uniform(170, 230), rng.uniform(10, 70)
    colour = (strong, weak, rng.uniform(10, 70)) if red else (rng.uniform(10, 70), weak, strong)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    fill = tuple(int(c) for c in colour)
    (draw.rectangle if square else draw.ellipse)(box, fill=fill)
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(img), {"square": square, "red": red, "large": large, "left": left}


def shapes_array(n: int, size: int = 32, seed: int = 0, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images start..start+n-1: ([n, size, size, 3] uint8, [n, 4] int64 attributes)."""
    images, attrs = [], []
    for i in range(start, start + n):
        img, a = render_shape(i, size, seed)
        images.append(img)
        attrs.append([a[k] for k in SHAPES_ATTRIBUTES])
    return np.stack(images), np.asarray(attrs, dtype=np.int64)


def shapes_oracle(images: np.ndarray) -> np.ndarray:
    """Read the four attributes back from pixels.

    images: [N, H, W, 3] uint8, or [N, 3, H, W] float in [-1, 1]. Returns [N, 4] int64 in
    SHAPES_ATTRIBUTES order. The foreground is where the colour is far from grey (the background is
    grey); shape comes from how much of its bounding box it fills (circle ~0.79, square ~1).
    """
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"expected a batch of images, got shape {arr.shape}")
    if arr.shape[1] == 3 and arr.shape[-1] != 3:
        arr = (np.clip(arr, -1, 1).transpose(0, 2, 3, 1) + 1) * 127.5
    arr = arr.astype(np.float64)
    n, h, w, _ = arr.shape
    out = np.zeros((n, 4), dtype=np.int64)
    saturation = arr.max(axis=-1) - arr.min(axis=-1)
    for i in range(n):
        mask = saturation[i] > 60
        if not mask.any():  # no foreground found: report the all-zero attribute vector
            continue
        ys, xs = np.nonzero(mask)
        area = mask.sum()
        bbox = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fg = arr[i][mask]
        out[i, 0] = int(area / bbox > 0.89)
        out[i, 1] = int(fg[:, 0].mean() > fg[:, 2].mean())
        out[i, 2] = int(area / (h * w) > 0.16)
        out[i, 3] = int(xs.mean() < w / 2)
    return out


# ---- Fashion-MNIST --------------------------------------------------------------------------------
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        _, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        if dtype_code != 0x08:
            raise ValueError(f"{path}: only uint8 IDX files are supported")
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def find_fashion_mnist(path: str | os.PathLike | None = None) -> Path:
    """The folder holding Fashion-MNIST's IDX files (``train-images-idx3-ubyte[.gz]`` ...)."""
    candidates = [Path(path)] if path else [Path(p) for p in (os.environ.get("FASHION_MNIST_DIR", ""),
                                                               *FASHION_MNIST_DIRS) if p]
    for folder in candidates:
        if any(folder.glob("train-images-idx3-ubyte*")):
            return folder
    raise FileNotFoundError(
        "Fashion-MNIST files not found in " + ", ".join(map(str, candidates))
        + ": install Debian's package (`apt-get install dataset-fashion-mnist`) or pass the folder that holds "
        "train-images-idx3-ubyte.gz"
    )


def fashion_mnist(split: str = "train", path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """([N, 28, 28] uint8 grayscale, [N] int64 labels) for split 'train' or 't10k'/'test'."""
    folder = find_fashion_mnist(path)
    prefix = "train" if split == "train" else "t10k"
    images = next(folder.glob(f"{prefix}-images-idx3-ubyte*"))
    labels = next(folder.glob(f"{prefix}-labels-idx1-ubyte*"))
    return _read_idx(images), _read_idx(labels).astype(np.int64)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits: ([1797, 8, 8] uint8 in 0..255, [1797] labels)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images * (255.0 / 16.0)).round().astype(np.uint8), data.target.astype(np.int64)
