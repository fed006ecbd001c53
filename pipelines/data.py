"""Ray Data sources and preprocessing for Diff-AE, and the ``diffae data prepare`` job.

Sources (the ``source`` string every job takes):

* an image folder, local or ``s3://`` (recursive; .jpg .jpeg .png .webp .bmp; any PIL mode: RGB,
  RGBA, grayscale, 16-bit, palette; EXIF orientation honoured). The id is the path relative to the folder.
* parquet (a ``.parquet`` file or a folder of them) with an ``image`` column of encoded bytes (or
  Hugging Face's ``{bytes, path}`` struct), an optional ``id`` column (else the sha1 of the bytes) and
  integer/bool attribute columns. ``diffae data prepare`` writes exactly this.
* built-ins: ``shapes`` / ``shapes:N`` (N procedural images with four binary attributes, see
  ``diffae_core.datasets``; default 10,000), ``fashion-mnist`` / ``fashion-mnist:t10k`` (Debian's files
  or ``$FASHION_MNIST_DIR``; column ``label``), ``digits`` (scikit-learn's 8x8 digits; column ``label``).

Preprocessing runs in Ray Data CPU tasks: decode, optional CelebA D2C crop, resize of the shorter side
(antialiased bicubic), centre crop, random horizontal flip (training split only), float [-1, 1] CHW.
Images that cannot be read or decoded are skipped and counted by a :class:`SkipTracker` (unique ids;
its count goes into every job summary and the ``diffae_data_skipped_images_total`` metric).

Library entry points: :func:`load_dataset` (a Ray Dataset of preprocessed images) and
:func:`open_images` (the same plus attribute names and the skip tracker); :func:`prepare`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
import ray.data
from PIL import Image
from ray.data import FileShuffleConfig

from diffae_core import storage
from diffae_core.images import decode_image, pil_to_tensor, resize_center_crop, to_rgb

from .attributes import AttributeTable, read_attribute_table
from .cluster import on_this_node
from .jobkit import JobConfig, option

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
BUILTINS = ("shapes", "fashion-mnist", "digits")
CROPS = ("center", "celeba-d2c")
SPLITS = ("all", "train", "heldout")
# The official CelebA crop (D2C): rows 57..184 and columns 25..152 of the aligned 178x218 image,
# as a PIL box (left, top, right, bottom) with exclusive right/bottom.
D2C_BOX = (25, 57, 153, 185)
DEFAULT_SHAPES = 10_000
ROWS_PER_BLOCK = 64  # source rows per Ray Data block: enough tasks to spread decoding over CPUs
MISSING_ATTRIBUTE = -1  # value of an attribute an image has no row for in the attribute file


# ---- counting skipped images ------------------------------------------------------------------
@ray.remote(num_cpus=0)
class _SkipLedger:
    """Unique ids of skipped images (a retried task or a second epoch does not count twice)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter

        self._skipped: dict[str, str] = {}
        self._unlabelled: set[str] = set()
        self._metric = Counter("diffae_data_skipped_images_total",
                               description="images skipped because they could not be read or decoded")

    def add(self, skipped: list[tuple[str, str]], unlabelled: list[str]) -> None:
        new = [(k, v) for k, v in skipped if k not in self._skipped]
        self._skipped.update(new)
        self._unlabelled.update(unlabelled)
        if new:
            self._metric.inc(len(new))

    def summary(self, max_examples: int) -> dict[str, Any]:
        examples = [{"id": k, "reason": v} for k, v in sorted(self._skipped.items())[:max_examples]]
        return {"skipped": len(self._skipped), "skipped_examples": examples, "unlabelled": len(self._unlabelled)}


class SkipTracker:
    """Counts, across every Ray Data task of a job, the images that were skipped as unreadable.

    Create it on the driver; tasks receive it pickled (it holds an actor handle). ``summary()`` after
    the data has been consumed gives ``{"skipped": n, "skipped_examples": [...], "unlabelled": m}``
    (``unlabelled``: images with no row in the attribute file; they are kept with attributes -1).
    """

    def __init__(self) -> None:
        self._ledger = _SkipLedger.options(scheduling_strategy=on_this_node()).remote()

    def record(self, skipped: list[tuple[str, str]], unlabelled: list[str]) -> None:
        if skipped or unlabelled:
            # Wait for the actor: the count must be complete once the last task has finished.
            ray.get(self._ledger.add.remote(skipped, unlabelled))

    def summary(self, max_examples: int = 10) -> dict[str, Any]:
        return ray.get(self._ledger.summary.remote(max_examples))

    def count(self) -> int:
        return int(self.summary(0)["skipped"])

    def job_summary(self, max_examples: int = 10) -> dict[str, Any]:
        """``skipped_images`` and ``skipped_examples``: what every job's summary reports about unreadable images."""
        summary = self.summary(max_examples)
        return {"skipped_images": summary["skipped"], "skipped_examples": summary["skipped_examples"]}


# ---- preprocessing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    """How one image becomes a training example.

    image_size: output side S; crop: "center" (resize shorter side to S, centre crop) or "celeba-d2c"
    (the D2C box first, then the same); flip: random horizontal flip with p = 0.5; output: "tensor"
    (float32 [3, S, S] in [-1, 1]) or "png" (PNG bytes of the S x S RGB image, for ``prepare``).
    """

    image_size: int
    crop: str = "center"
    flip: bool = False
    output: str = "tensor"

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"unknown crop {self.crop!r}; choose one of {CROPS}")
        if self.output not in ("tensor", "png"):
            raise ValueError(f"unknown output {self.output!r}; use 'tensor' or 'png'")
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")

    def square(self, image: Image.Image) -> Image.Image:
        """RGB image of any size -> RGB S x S (D2C crop if asked, resize shorter side, centre crop)."""
        if self.crop == "celeba-d2c":
            left, top, right, bottom = D2C_BOX
            if image.width < right or image.height < bottom:
                raise ValueError(
                    f"image is {image.width}x{image.height}; the CelebA D2C crop needs the aligned 178x218 "
                    "CelebA images (at least 153x185)"
                )
            image = image.crop(D2C_BOX)
        if image.size == (self.image_size, self.image_size):
            return image
        return resize_center_crop(image, self.image_size)


def _pixels_to_pil(pixels: np.ndarray) -> Image.Image:
    """uint8/uint16 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> RGB PIL image."""
    arr = np.asarray(pixels)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype == np.uint16:
        return to_rgb(Image.fromarray(arr, "I;16"))
    return to_rgb(Image.fromarray(arr.astype(np.uint8)))


def _image_bytes(value: Any) -> bytes:
    if isinstance(value, dict):  # Hugging Face image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"image cell holds {type(value).__name__}, not encoded image bytes")
    return bytes(value)


def is_heldout(image_id: str, fraction: float) -> bool:
    """Stable held-out membership: sha1(id) mapped to [0, 1) is below ``fraction``."""
    if fraction <= 0.0:
        return False
    digest = hashlib.sha1(image_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def _process_batch(
    batch: dict[str, np.ndarray],
    prep: Preprocess,
    endpoint: str | None,
    attributes: tuple[str, ...],
    table: AttributeTable | None,
    split: str,
    holdout: float,
    skips: SkipTracker,
) -> dict[str, np.ndarray]:
    """Raw rows (id + one of path / image / pixels + attributes) -> preprocessed rows.

    Unreadable or undecodable rows are dropped and recorded in ``skips`` (never raised: one bad file
    must not stop a million-image job).
    """
    ids = [str(i) for i in batch["id"]]
    rng = np.random.default_rng()  # flips are augmentation noise; everything else is deterministic
    images, kept, skipped = [], [], []
    for row, image_id in enumerate(ids):
        if split != "all" and is_heldout(image_id, holdout) != (split == "heldout"):
            continue
        try:
            image = prep.square(_decode_row(batch, row, endpoint))
        except (OSError, ValueError) as exc:  # unreadable file, undecodable bytes, too small for the crop
            log.warning("skipping image %s: %s", image_id, exc)
            skipped.append((image_id, str(exc)[:200]))
            continue
        images.append(_encode_row(image, prep, rng))
        kept.append(row)
    out: dict[str, np.ndarray] = {"id": np.array([ids[r] for r in kept], dtype=object)}
    if prep.output == "png":
        out["image"] = np.array(images, dtype=object)
    else:
        size = prep.image_size
        out["image"] = np.stack(images) if images else np.zeros((0, 3, size, size), np.float32)
    for name in attributes:
        if name in batch:
            out[name] = np.asarray(batch[name])[kept].astype(np.int64)
    unlabelled = _join_attributes(out, [ids[r] for r in kept], table) if table is not None else []
    skips.record(skipped, unlabelled)
    return out


def _decode_row(batch: dict[str, np.ndarray], row: int, endpoint: str | None) -> Image.Image:
    """Row ``row`` of a raw batch as an RGB image, whichever of path / image / pixels the source gives."""
    if "path" in batch:
        return decode_image(storage.read_bytes(str(batch["path"][row]), endpoint))
    if "image" in batch:
        return decode_image(_image_bytes(batch["image"][row]))
    return _pixels_to_pil(batch["pixels"][row])


def _encode_row(image: Image.Image, prep: Preprocess, rng: np.random.Generator) -> Any:
    """An S x S image as the output row: PNG bytes, or float32 [3,S,S] in [-1,1] (flipped with p = 0.5)."""
    if prep.output == "png":
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    x = pil_to_tensor(image).numpy()
    return np.ascontiguousarray(x[:, :, ::-1]) if prep.flip and rng.random() < 0.5 else x


def _join_attributes(out: dict[str, np.ndarray], ids: list[str], table: AttributeTable) -> list[str]:
    """Add the attribute file's columns to ``out`` for ``ids`` (-1 where it has no row); returns those ids."""
    rows, unlabelled = [], []
    for image_id in ids:
        values = table.lookup(image_id)
        if values is None:
            unlabelled.append(image_id)
            values = (MISSING_ATTRIBUTE,) * len(table.names)
        rows.append(values)
    matrix = np.array(rows, dtype=np.int64).reshape(len(ids), len(table.names))
    for j, name in enumerate(table.names):
        out[name] = matrix[:, j]
    return unlabelled


# ---- sources ----------------------------------------------------------------------------------
def _indices(batch: dict[str, np.ndarray], order: np.ndarray | None) -> np.ndarray:
    index = np.asarray(batch["id"], dtype=np.int64)
    return index if order is None else order[index]


def _render_shapes(batch: dict[str, np.ndarray], size: int, seed: int, order: np.ndarray | None) -> dict[str, np.ndarray]:
    from diffae_core.datasets import SHAPES_ATTRIBUTES, render_shape

    index = _indices(batch, order)
    pixels, attrs = [], []
    for i in index:
        img, a = render_shape(int(i), size, seed)
        pixels.append(img)
        attrs.append([a[k] for k in SHAPES_ATTRIBUTES])
    out = {"id": np.array([f"shapes-{i:07d}" for i in index], dtype=object), "pixels": np.stack(pixels)}
    matrix = np.asarray(attrs, dtype=np.int64).reshape(len(pixels), len(SHAPES_ATTRIBUTES))
    for j, name in enumerate(SHAPES_ATTRIBUTES):
        out[name] = matrix[:, j]
    return out


def _take_arrays(
    batch: dict[str, np.ndarray], ref: ray.ObjectRef, prefix: str, order: np.ndarray | None
) -> dict[str, np.ndarray]:
    images, labels = ray.get(ref)  # zero-copy view of the arrays in the object store
    index = _indices(batch, order)
    return {"id": np.array([f"{prefix}-{i:07d}" for i in index], dtype=object),
            "pixels": images[index], "label": labels[index]}


def _blocks(n: int) -> int:
    return max(1, min(2000, -(-n // ROWS_PER_BLOCK)))


def _order(n: int, shuffle_seed: int | None) -> np.ndarray | None:
    return None if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(n)


def _builtin(
    source: str, size: int, seed: int, shuffle_seed: int | None
) -> tuple[ray.data.Dataset, tuple[str, ...]]:
    name, _, arg = source.partition(":")
    if name == "shapes":
        from diffae_core.datasets import SHAPES_ATTRIBUTES

        try:
            n = int(arg) if arg else DEFAULT_SHAPES
        except ValueError:
            raise ValueError(f"write shapes:N with an integer N, got {source!r}") from None
        ds = ray.data.range(n, override_num_blocks=_blocks(n))
        kwargs = {"size": size, "seed": seed, "order": _order(n, shuffle_seed)}
        return ds.map_batches(_render_shapes, fn_kwargs=kwargs), SHAPES_ATTRIBUTES
    if name == "fashion-mnist":
        from diffae_core.datasets import fashion_mnist

        arrays = fashion_mnist(arg or "train")
    else:
        from diffae_core.datasets import digits

        if arg:
            raise ValueError(f"'digits' takes no argument, got {source!r}")
        arrays = digits()
    n = len(arrays[1])
    ds = ray.data.range(n, override_num_blocks=_blocks(n))
    kwargs = {"ref": ray.put(arrays), "prefix": name, "order": _order(n, shuffle_seed)}
    return ds.map_batches(_take_arrays, fn_kwargs=kwargs), ("label",)


def _parquet(
    fs: pafs.FileSystem, path: str, shuffle_seed: int | None
) -> tuple[ray.data.Dataset, tuple[str, ...]]:
    shuffle = None if shuffle_seed is None else FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=False)
    ds = ray.data.read_parquet(path, filesystem=fs, shuffle=shuffle)
    schema = ds.schema()
    names = list(schema.names)
    if "image" not in names:
        raise ValueError(f"parquet at {path!r} has no 'image' column (columns: {names})")
    types = dict(zip(schema.names, schema.types, strict=True))
    attributes = tuple(
        n for n in names
        if n not in ("image", "id") and isinstance(types[n], pa.DataType)
        and (pa.types.is_integer(types[n]) or pa.types.is_boolean(types[n]))
    )
    ds = ds.select_columns(["image", *(["id"] if "id" in names else []), *attributes])
    if "id" not in names:
        ds = ds.map_batches(_hash_ids)
    return ds, attributes


def _hash_ids(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    batch["id"] = np.array([hashlib.sha1(_image_bytes(v)).hexdigest()[:20] for v in batch["image"]], dtype=object)
    return batch


def _folder(root: str, files: list[str]) -> ray.data.Dataset:
    items = [{"id": posixpath.relpath(storage.filesystem(p)[1], root), "path": p} for p in files]
    return ray.data.from_items(items, override_num_blocks=_blocks(len(items)))


def read_source(
    source: str, image_size: int, s3_endpoint: str | None = None, seed: int = 0, shuffle_seed: int | None = None
) -> tuple[ray.data.Dataset, tuple[str, ...]]:
    """The raw rows of a source: ``(dataset, attribute column names)``.

    Rows carry ``id`` and one of ``path`` (the URI of a file to read), ``image`` (encoded bytes) or ``pixels``
    (uint8 [H, W(, C)]); built-ins are rendered at ``image_size`` directly. The order is sorted (by path,
    index or parquet file) unless ``shuffle_seed`` is given: then it is a permutation fixed by that seed
    (whole list for folders and built-ins, file order for parquet).
    """
    if is_builtin(source):
        return _builtin(source, image_size, seed, shuffle_seed)
    fs, path = storage.filesystem(source, s3_endpoint)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data source {source!r} does not exist (nor is it one of {BUILTINS})")
    if info.type == pafs.FileType.File:
        if path.lower().endswith(".parquet"):
            return _parquet(fs, path, shuffle_seed)
        raise ValueError(f"{source!r} is a single file; pass a folder of images or parquet")
    files = storage.list_files(source, IMAGE_EXTENSIONS, s3_endpoint)
    if not files:
        if storage.list_files(source, (".parquet",), s3_endpoint):
            return _parquet(fs, path, shuffle_seed)
        raise ValueError(f"{source!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no parquet files")
    if shuffle_seed is not None:
        files = [files[i] for i in np.random.default_rng(shuffle_seed).permutation(len(files))]
    return _folder(path, files), ()


def is_builtin(source: str) -> bool:
    """True for the built-in sets (``shapes``, ``shapes:N``, ``fashion-mnist[:t10k]``, ``digits``)."""
    return str(source).partition(":")[0] in BUILTINS


def source_uri(source: str) -> str:
    """A source as every Ray worker can read it: built-in names unchanged, local paths made absolute."""
    return source if is_builtin(source) else storage.absolute(source)


@dataclass
class ImageData:
    """A preprocessed data set: ``dataset`` rows are {"image", "id", *attributes}; see :func:`open_images`."""

    dataset: ray.data.Dataset
    attributes: tuple[str, ...]
    skips: SkipTracker


def open_images(
    source: str,
    image_size: int,
    *,
    split: str = "all",
    holdout: float = 0.0,
    flip: bool | None = None,
    crop: str = "center",
    attributes: str | None = None,
    s3_endpoint: str | None = None,
    seed: int = 0,
    shuffle_seed: int | None = None,
    output: str = "tensor",
) -> ImageData:
    """The images of a source, preprocessed, as a Ray Dataset, with their attribute names and skip counter.

    Rows: ``image`` float32 [3, S, S] in [-1, 1] (S = ``image_size``; PNG bytes with ``output="png"``),
    ``id`` str (stable across runs: the relative path for folders, the ``id`` column or sha1 of the bytes for
    parquet, ``shapes-0000042`` etc. for built-ins), and one int64 column per attribute (0/1 for binary
    ones, ``label`` for fashion-mnist/digits, -1 where the attribute file has no row for the image).

    source: folder / parquet / ``s3://`` URI / built-in (see the module docstring).
    split: "all" (every image), "train" (images outside the held-out set) or "heldout" (images whose
        ``sha1(id)`` falls below ``holdout``; a stable split every job agrees on).
    flip: random horizontal flip; default on for split "train" only.
    crop: "center" or "celeba-d2c" (the official CelebA crop before resizing).
    attributes: optional CSV or CelebA-HQ annotation file joined on the image id.
    s3_endpoint: S3 endpoint override (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL).
    seed: generation seed of built-in ``shapes``.
    shuffle_seed: read the source in an order fixed by this seed (see :func:`read_source`); training
        sets it so that a sorted folder is not fed class by class.

    Unreadable images are skipped and counted by the returned :class:`SkipTracker`.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    endpoint = storage.s3_endpoint(s3_endpoint)
    raw, names = read_source(source, image_size, endpoint, seed, shuffle_seed)
    table = read_attribute_table(attributes, endpoint) if attributes else None
    if table is not None:
        clash = set(table.names) & {"image", "id"}
        if clash:
            raise ValueError(f"attribute file has reserved column name(s) {sorted(clash)}")
        names = tuple(n for n in names if n not in table.names)  # the file wins over the source's columns
    skips = SkipTracker()
    prep = Preprocess(image_size, crop=crop, flip=(split == "train") if flip is None else flip, output=output)
    ds = raw.map_batches(
        _process_batch,
        batch_size=ROWS_PER_BLOCK,
        fn_kwargs={"prep": prep, "endpoint": endpoint, "attributes": names, "table": table, "split": split,
                   "holdout": holdout, "skips": skips},
    )
    return ImageData(ds, names + (table.names if table else ()), skips)


def load_dataset(source: str, image_size: int, **options: Any) -> ray.data.Dataset:
    """The Ray Dataset of :func:`open_images` (same arguments), for callers that need only the rows."""
    return open_images(source, image_size, **options).dataset


# ---- prepare ----------------------------------------------------------------------------------
DATASET_INFO = "dataset.json"


def prepare(
    source: str,
    destination: str,
    image_size: int,
    *,
    attributes: str | None = None,
    crop: str = "center",
    s3_endpoint: str | None = None,
    rows_per_file: int = 5000,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``source`` as sharded parquet at ``destination`` (local or ``s3://``), streaming.

    Each row: ``id`` str, ``image`` PNG bytes of the S x S RGB image (S = image_size, after the crop and
    resize; no flip), one int64 column per attribute. ``dataset.json`` next to the shards records the
    summary, which is also returned: images written, skipped (with examples), unlabelled, attributes.
    """
    start = time.time()
    endpoint = storage.s3_endpoint(s3_endpoint)
    source, destination = source_uri(source), storage.absolute(destination)
    if storage.is_dir(destination, endpoint) and storage.list_files(destination, (".parquet",), endpoint):
        raise FileExistsError(f"{destination!r} already holds parquet files; choose an empty destination")
    # Shards are written in a seeded random order, so readers that only shuffle locally still mix well.
    data = open_images(source, image_size, split="all", flip=False, crop=crop, attributes=attributes,
                       s3_endpoint=endpoint, seed=seed, shuffle_seed=seed, output="png")
    fs, path = storage.filesystem(destination, endpoint)
    data.dataset.write_parquet(path, filesystem=fs, min_rows_per_file=rows_per_file)
    written = [storage.filesystem(uri, endpoint)[1] for uri in storage.list_files(destination, (".parquet",), endpoint)]
    count = ray.data.read_parquet(written, filesystem=fs).count() if written else 0
    summary = {
        "source": source,
        "destination": destination,
        "image_size": image_size,
        "crop": crop,
        "images": count,
        "files": len(written),
        "attributes": list(data.attributes),
        **data.skips.summary(),
        "seconds": round(time.time() - start, 2),
    }
    storage.write_json(storage.join(destination, DATASET_INFO), summary, endpoint)
    return summary


@dataclass(kw_only=True)
class PrepareJob(JobConfig):
    """Prepare a data set: decode, crop and resize images into sharded parquet (local or s3://)."""

    job_name: ClassVar[str] = "data_prepare"

    source: str = option(positional=True, help=f"image folder, parquet, s3:// URI, or a built-in: {', '.join(BUILTINS)} "
                                               "(shapes:N for N images, fashion-mnist:t10k for the test file)")
    destination: str = option(positional=True, help="output folder or s3://bucket/prefix (must hold no parquet yet)")
    image_size: int = option(help="side S of the stored S x S images")
    attributes: str | None = option(None, help="CSV or CelebA-HQ annotation file (CelebAMask-HQ-attribute-anno.txt) "
                                               "joined on the image id")
    crop: str = option("center", choices=CROPS, help="'celeba-d2c': the official CelebA crop before resizing")
    rows_per_file: int = option(5000, help="minimum rows per parquet shard")
    seed: int = option(0, help="generation seed of the built-in shapes set")


def _run(job: PrepareJob) -> dict[str, Any]:
    summary = prepare(job.source, job.destination, job.image_size, attributes=job.attributes, crop=job.crop,
                      s3_endpoint=job.s3_endpoint, rows_per_file=job.rows_per_file, seed=job.seed)
    print(f"prepared {summary['images']} images into {summary['files']} parquet file(s) at {job.destination}; "
          f"skipped {summary['skipped']} unreadable image(s)"
          + (f", {summary['unlabelled']} without attributes" if summary["unlabelled"] else ""))
    for example in summary["skipped_examples"]:
        print(f"  skipped {example['id']}: {example['reason']}")
    return summary


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    from .jobkit import run_cli

    return run_cli(PrepareJob, argv, prog, _run)


if __name__ == "__main__":
    sys.exit(main(prog="python -m pipelines.data"))
