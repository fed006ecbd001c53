"""EMA arithmetic and image conversions."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffae_core.ema import EMA
from diffae_core.images import (
    decode_image,
    load_image_tensor,
    make_grid,
    pil_to_tensor,
    png_bytes,
    tensor_to_pil,
)


def test_ema_matches_the_formula_and_skips_integer_buffers():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(net, decay=0.9)
    start = {k: v.clone() for k, v in ema.shadow.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update()
    for k, v in ema.shadow.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.9 * start[k] + 0.1 * net.state_dict()[k])
    assert ema.shadow.state_dict()["1.num_batches_tracked"] == start["1.num_batches_tracked"]
    assert all(not p.requires_grad for p in ema.shadow.parameters())


def test_ema_warmup_ramps_decay_and_state_round_trips():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.9999, warmup_steps=100)
    assert ema.current_decay() == 0.0
    for _ in range(50):
        ema.update()
    assert ema.current_decay() == pytest.approx(0.9999 / 2)
    for _ in range(60):
        ema.update()
    assert ema.current_decay() == 0.9999
    other = EMA(net, decay=0.9999, warmup_steps=100)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 110


def _png(mode: str, size=(40, 20), value=None) -> bytes:
    arr = np.random.default_rng(0).integers(0, 255, size=(size[1], size[0], len(mode) if mode != "I;16" else 1))
    if mode == "I;16":
        img = Image.fromarray((arr[..., 0] * 257).astype(np.uint16))
    else:
        img = Image.fromarray(arr.astype(np.uint8).squeeze(), mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "I;16"])
def test_any_mode_becomes_a_square_rgb_tensor(mode):
    x = load_image_tensor(_png(mode), 16)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert decode_image(buf.getvalue()).size == (20, 40)


def test_undecodable_and_oversized_images_are_value_errors():
    with pytest.raises(ValueError, match="cannot decode"):
        decode_image(b"definitely not an image")
    with pytest.raises(ValueError, match="more than the limit"):
        decode_image(_png("RGB", size=(100, 100)), max_pixels=5000)


def test_png_round_trip_and_grid():
    x = pil_to_tensor(tensor_to_pil(torch.rand(3, 8, 8) * 2 - 1))
    assert torch.allclose(load_image_tensor(png_bytes(x), 8), x, atol=1 / 127.5)
    grid = make_grid(torch.zeros(5, 3, 8, 8), nrow=3, pad=2)
    assert grid.size == (3 * 10 + 2, 2 * 10 + 2)
