"""Built-in data sets: deterministic shapes with a pixel oracle, Fashion-MNIST, digits."""

import numpy as np
import pytest

from diffae_core.datasets import (
    SHAPES_ATTRIBUTES,
    digits,
    fashion_mnist,
    find_fashion_mnist,
    render_shape,
    shapes_array,
    shapes_attributes,
    shapes_oracle,
)


def test_shapes_are_deterministic_and_random_access():
    a, attrs_a = shapes_array(6, size=24, seed=3)
    b, _ = shapes_array(3, size=24, seed=3, start=3)
    assert np.array_equal(a[3:], b)
    img, attrs = render_shape(4, size=24, seed=3)
    assert np.array_equal(img, a[4]) and [attrs[k] for k in SHAPES_ATTRIBUTES] == list(attrs_a[4])
    assert shapes_attributes(4, seed=3) == attrs
    assert not np.array_equal(shapes_array(1, 24, seed=4)[0], a[:1])


def test_attributes_are_balanced_and_the_oracle_reads_them_back():
    images, attrs = shapes_array(400, size=32)
    assert np.all(np.abs(attrs.mean(0) - 0.5) < 0.1)
    assert np.array_equal(shapes_oracle(images), attrs)
    # float [-1, 1] CHW input gives the same answer
    chw = images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    assert np.array_equal(shapes_oracle(chw), attrs)


def test_oracle_sees_changes():
    images, attrs = shapes_array(50, size=32)
    grey = images.mean(axis=-1, keepdims=True).repeat(3, axis=-1).astype(np.uint8)
    assert np.array_equal(shapes_oracle(grey), np.zeros_like(attrs))
    swapped = images[..., ::-1].copy()  # red <-> blue channels
    assert np.array_equal(shapes_oracle(swapped)[:, 1], 1 - attrs[:, 1])
    mirrored = images[:, :, ::-1].copy()
    assert np.array_equal(shapes_oracle(mirrored)[:, 3], 1 - attrs[:, 3])


def test_digits():
    images, labels = digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and set(labels) == set(range(10))


def test_fashion_mnist_from_debian_or_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        find_fashion_mnist(tmp_path)
    try:
        find_fashion_mnist()
    except FileNotFoundError:
        pytest.skip("Debian's package `dataset-fashion-mnist` is not installed (make test installs it as root)")
    images, labels = fashion_mnist("t10k")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
