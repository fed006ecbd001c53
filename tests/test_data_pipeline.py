"""Ray Data sources, preprocessing, attribute files and `diffae data prepare` (real local Ray)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipelines import data
from pipelines.attributes import parse_attribute_csv, parse_celebahq_annotations, read_attribute_table
from pipelines.cli import main as cli_main

pytestmark = pytest.mark.timeout(240)


def _half_red_half_blue(width: int, height: int, split: str) -> np.ndarray:
    """uint8 [H, W, 3]: red in the top (split='rows') or left (split='cols') half, blue elsewhere."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[..., 2] = 255
    if split == "rows":
        arr[: height // 2] = (255, 0, 0)
    else:
        arr[:, : width // 2] = (255, 0, 0)
    return arr


def make_image_folder(root, n_good: int = 6, corrupt: int = 1) -> dict[str, str]:
    """A folder with every supported format and mode, a sub-folder, hidden files and ``corrupt`` bad files.

    Returns id -> a short description of each good image.
    """
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    kinds: dict[str, str] = {}

    def rand(h: int, w: int, c: int = 3) -> np.ndarray:
        return rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)

    Image.fromarray(rand(40, 60)).save(root / "rgb.jpg", quality=95)
    kinds["rgb.jpg"] = "jpeg"
    Image.fromarray(rand(30, 30, 4), "RGBA").save(root / "sub" / "alpha.png")
    kinds["sub/alpha.png"] = "rgba"
    Image.fromarray(rng.integers(0, 65536, size=(24, 20), dtype=np.uint16)).save(root / "gray16.png")
    kinds["gray16.png"] = "16-bit"
    Image.fromarray(rand(20, 20)[..., 0], "L").save(root / "gray.webp")
    kinds["gray.webp"] = "grayscale webp"
    Image.fromarray(rand(20, 26)).convert("P").save(root / "sub" / "palette.bmp")
    kinds["sub/palette.bmp"] = "palette bmp"
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): stored top red -> displayed right red
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_half_red_half_blue(16, 32, "rows")).save(root / "exif.jpg", exif=exif, quality=95)
    kinds["exif.jpg"] = "exif"
    for i in range(max(0, n_good - len(kinds))):
        Image.fromarray(rand(18, 18)).save(root / f"extra{i}.png")
        kinds[f"extra{i}.png"] = "png"
    for i in range(corrupt):
        (root / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" + bytes(i))
    (root / ".hidden" / "x.png").write_bytes(b"ignored")
    (root / "notes.txt").write_text("not an image")
    return kinds


def test_attribute_files(tmp_path):
    anno = "3\nSmiling Male\n0.jpg 1 -1\n1.jpg -1 -1\n2.jpg 1 1\n"
    table = parse_celebahq_annotations(anno)
    assert table.names == ("Smiling", "Male")
    assert table.lookup("0.jpg") == (1, 0) and table.lookup("imgs/2.jpg") == (1, 1) and table.lookup("1") == (0, 0)
    assert table.lookup("7.jpg") is None
    with pytest.raises(ValueError, match="header says 4"):
        parse_celebahq_annotations(anno.replace("3\n", "4\n", 1))

    csv_table = parse_attribute_csv("image,label,odd\na.png,3,1\nb.png,7,0\n")
    assert csv_table.names == ("label", "odd") and csv_table.lookup("a") == (3, 1)
    binary = parse_attribute_csv("file,Young\nx.jpg,-1\ny.jpg,1\n")
    assert binary.lookup("x.jpg") == (0,) and binary.lookup("y.jpg") == (1,)
    with pytest.raises(ValueError, match="integers"):
        parse_attribute_csv("file,a\nx.jpg,maybe\n")
    (tmp_path / "anno.txt").write_text(anno)
    assert read_attribute_table(str(tmp_path / "anno.txt")).names == ("Smiling", "Male")


def test_preprocess_crops_and_orientation():
    prep = data.Preprocess(16)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(_half_red_half_blue(16, 32, "rows")).save(buf, format="JPEG", exif=exif, quality=95)
    from diffae_core.images import decode_image

    x = np.asarray(prep.square(decode_image(buf.getvalue())), np.float32)
    assert x.shape == (16, 16, 3)
    assert x[:, 12:, 0].mean() > 200 and x[:, :4, 0].mean() < 60  # displayed with red on the right

    celeba = np.zeros((218, 178, 3), np.uint8)
    celeba[57:185, 25:153] = (0, 255, 0)  # exactly the D2C box is green
    out = np.asarray(data.Preprocess(32, crop="celeba-d2c").square(Image.fromarray(celeba)), np.float32)
    assert out.shape == (32, 32, 3) and out[..., 1].min() > 250 and out[..., 0].max() < 5
    with pytest.raises(ValueError, match="D2C"):
        data.Preprocess(32, crop="celeba-d2c").square(Image.new("RGB", (100, 100)))
    assert data.is_heldout("x", 0.0) is False


def test_folder_prepare_and_parquet_roundtrip(ray_cluster, tmp_path, capsys):
    kinds = make_image_folder(tmp_path / "imgs", n_good=8, corrupt=2)
    anno_lines = [f"{name.split('/')[-1]} {1 if i % 2 else -1} -1" for i, name in enumerate(sorted(kinds))]
    (tmp_path / "anno.txt").write_text(f"{len(anno_lines)}\nSmiling Male\n" + "\n".join(anno_lines) + "\n")

    # the folder read directly: every format decodes, the corrupt files are counted, not raised
    images = data.open_images(str(tmp_path / "imgs"), 16, split="all")
    rows = images.dataset.take_all()
    assert sorted(r["id"] for r in rows) == sorted(kinds)
    for r in rows:
        assert r["image"].shape == (3, 16, 16) and r["image"].dtype == np.float32
        assert -1.0 <= r["image"].min() and r["image"].max() <= 1.0
    summary = images.skips.summary()
    assert summary["skipped"] == 2 and {e["id"] for e in summary["skipped_examples"]} == {"broken0.jpg", "broken1.jpg"}

    # prepare through the CLI, with CelebA-HQ annotations; then read the parquet back
    out = tmp_path / "prepared"
    assert cli_main(["data", "prepare", str(tmp_path / "imgs"), str(out), "--image-size", "16",
                     "--attributes", str(tmp_path / "anno.txt")]) == 0
    printed = capsys.readouterr().out
    assert "skipped 2 unreadable image(s)" in printed
    result = json.loads(printed.strip().splitlines()[-1])
    assert result["images"] == len(kinds) and result["skipped"] == 2 and result["attributes"] == ["Smiling", "Male"]
    assert json.loads((out / data.DATASET_INFO).read_text())["skipped"] == 2
    with pytest.raises(FileExistsError):
        data.prepare(str(tmp_path / "imgs"), str(out), 16)

    loaded = data.open_images(str(out), 16, split="all")
    assert loaded.attributes == ("Smiling", "Male")
    back = {r["id"]: r for r in loaded.dataset.take_all()}
    assert set(back) == set(kinds)
    expected = {name: (1 if i % 2 else 0) for i, name in enumerate(sorted(kinds))}
    assert all(back[k]["Smiling"] == v and back[k]["Male"] == 0 for k, v in expected.items())
    # the stored PNG is the preprocessed image: decoding it again gives the folder's tensor
    direct = {r["id"]: r["image"] for r in rows}
    for k in kinds:
        np.testing.assert_allclose(back[k]["image"], direct[k], atol=1e-6)
    assert loaded.skips.count() == 0


def test_builtins_splits_and_flip(ray_cluster):
    from diffae_core.datasets import SHAPES_ATTRIBUTES, render_shape

    shapes = data.open_images("shapes:40", 16, split="all", shuffle_seed=3)
    rows = shapes.dataset.take_all()
    assert shapes.attributes == SHAPES_ATTRIBUTES and len({r["id"] for r in rows}) == 40
    r = next(r for r in rows if r["id"] == "shapes-0000007")
    img, attrs = render_shape(7, 16, 0)
    np.testing.assert_allclose(r["image"], img.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    assert {k: int(r[k]) for k in SHAPES_ATTRIBUTES} == attrs

    train = {r["id"] for r in data.load_dataset("shapes:40", 16, split="train", holdout=0.25).take_all()}
    held = {r["id"] for r in data.load_dataset("shapes:40", 16, split="heldout", holdout=0.25).take_all()}
    assert not train & held and train | held == {r["id"] for r in rows} and 3 <= len(held) <= 20

    flipped = data.load_dataset("shapes:40", 16, split="all", flip=True).take_all()
    by_id = {r["id"]: r["image"] for r in rows}
    n_flipped = sum(not np.array_equal(f["image"], by_id[f["id"]]) for f in flipped)
    assert all(np.array_equal(f["image"], by_id[f["id"]]) or np.array_equal(f["image"][:, :, ::-1], by_id[f["id"]])
               for f in flipped)
    assert 5 <= n_flipped <= 35

    digits = data.open_images("digits", 16, split="all")
    assert digits.attributes == ("label",)
    first = digits.dataset.take(4)
    assert first[0]["image"].shape == (3, 16, 16) and 0 <= first[0]["label"] <= 9
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.open_images("/no/such/folder", 16)
