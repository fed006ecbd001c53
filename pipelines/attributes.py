"""Per-image attribute tables: a CSV, or the CelebA-HQ annotation file, joined to images by id.

Two formats are read:

* CelebA-HQ ``CelebAMask-HQ-attribute-anno.txt``: line 1 the image count, line 2 the 40 attribute
  names, then one row per image, ``<idx>.jpg`` followed by 40 values in {-1, 1}.
* CSV with a header: the first column names the image (``0.jpg``, ``0`` or ``sub/0.jpg``), every
  other column is an integer attribute. CelebA's own ``list_attr_celeba.csv`` fits.

Values in {-1, 1} (or {-1, 0, 1}) are binarised to 1 if > 0 else 0, as the official classifier does;
other integers (class labels) are kept. An image is matched by its id, then its file name, then its
file name without extension, so ``img/0.jpg``, ``0.jpg`` and ``0`` all find the row ``0.jpg``.
"""

from __future__ import annotations

import csv
import io
import posixpath
from dataclasses import dataclass, field

from diffae_core import storage


@dataclass
class AttributeTable:
    """names: A attribute names; rows: key -> A ints (0/1 for binary attributes)."""

    names: tuple[str, ...]
    rows: dict[str, tuple[int, ...]]
    _by_stem: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        stems: dict[str, tuple[int, ...] | None] = {}
        for key, values in self.rows.items():
            stem = _stem(key)
            stems[stem] = None if stem in stems else values  # an ambiguous stem matches nothing
        self._by_stem = {k: v for k, v in stems.items() if v is not None}

    def lookup(self, image_id: str) -> tuple[int, ...] | None:
        """The row for an image id (exact, then file name, then stem), or None."""
        for key in (image_id, posixpath.basename(image_id)):
            if key in self.rows:
                return self.rows[key]
        return self._by_stem.get(_stem(image_id))

    def __len__(self) -> int:
        return len(self.rows)


def _stem(key: str) -> str:
    name = posixpath.basename(key.replace("\\", "/"))
    return name.rsplit(".", 1)[0] if "." in name else name


def _binarise(rows: dict[str, list[int]]) -> dict[str, tuple[int, ...]]:
    values = {v for row in rows.values() for v in row}
    if values and values <= {-1, 0, 1} and -1 in values:
        return {k: tuple(int(v > 0) for v in row) for k, row in rows.items()}
    return {k: tuple(row) for k, row in rows.items()}


def parse_celebahq_annotations(text: str) -> AttributeTable:
    """Parse ``CelebAMask-HQ-attribute-anno.txt`` (count line, names line, ``<idx>.jpg v1 .. v40`` rows)."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if len(lines) < 2 or len(lines[0]) != 1 or not lines[0][0].isdigit():
        raise ValueError("not a CelebA-HQ annotation file: line 1 must be the image count")
    names = tuple(lines[1])
    rows: dict[str, list[int]] = {}
    for number, parts in enumerate(lines[2:], start=3):
        if len(parts) != len(names) + 1:
            raise ValueError(f"line {number}: expected a file name and {len(names)} values, got {len(parts)} fields")
        rows[parts[0]] = [int(v) for v in parts[1:]]
    if len(rows) != int(lines[0][0]):
        raise ValueError(f"the header says {lines[0][0]} images but {len(rows)} rows follow")
    return AttributeTable(names, _binarise(rows))


def parse_attribute_csv(text: str) -> AttributeTable:
    """Parse a CSV whose first column is the image name and whose other columns are integer attributes."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header or len(header) < 2:
        raise ValueError("attribute CSV needs a header row: an image-name column, then attribute columns")
    names = tuple(h.strip() for h in header[1:])
    rows: dict[str, list[int]] = {}
    for number, parts in enumerate(reader, start=2):
        if not parts:
            continue
        if len(parts) != len(header):
            raise ValueError(f"CSV line {number}: {len(parts)} fields, the header has {len(header)}")
        try:
            rows[parts[0].strip()] = [int(float(v)) for v in parts[1:]]
        except ValueError:
            raise ValueError(f"CSV line {number}: attribute values must be integers, got {parts[1:]}") from None
    return AttributeTable(names, _binarise(rows))


def read_attribute_table(uri: str, endpoint: str | None = None) -> AttributeTable:
    """Read a CSV or CelebA-HQ annotation file from a path, ``file://`` or ``s3://`` URI."""
    text = storage.read_bytes(uri, endpoint).decode("utf-8-sig")
    first = text.lstrip().split("\n", 1)[0].strip()
    if first.isdigit():
        return parse_celebahq_annotations(text)
    return parse_attribute_csv(text)
