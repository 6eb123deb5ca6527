"""The ``image_folder`` dataset format: a zip of ``<class>/<image>.png|jpg`` (or ``train/<class>/...``
and ``val/<class>/...``).

Options ``image_size`` [H, W] (default [32, 32]), ``grayscale`` (default false), ``normalize``
``"none"`` (default) | ``"dataset"`` | ``"imagenet"``. Output: float32 images [N, C, H, W] in [0, 1]
(before normalising), int64 labels indexing the sorted class names (``Dataset.classes``).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from engine.registry import dataset_formats
from engine.errors import EngineError
from engine.data.dataset import Dataset, DatasetFormat, check_dataset, dataset_error, first_line
from engine.inspection.zipcheck import refuse_unsafe_zip

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
#: The largest image member and the most pixels one image may have (checked before decoding).
MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_IMAGE_PIXELS = 100_000_000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_options(options: dict) -> tuple[tuple[int, int], bool, str]:
    """``((height, width), grayscale, normalize)`` from a dataset's options, checked."""
    size = options.get("image_size", [32, 32])
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 4096 for s in size)):
        raise dataset_error(f"options.image_size must be [height, width] with 1..4096 pixels each, got {size!r}")
    gray = options.get("grayscale", False)
    if not isinstance(gray, bool):
        raise dataset_error(f"options.grayscale must be a boolean, got {gray!r}")
    norm = options.get("normalize", "none")
    if norm not in ("none", "dataset", "imagenet"):
        raise dataset_error(f"options.normalize must be 'none', 'dataset' or 'imagenet', got {norm!r}")
    return (int(size[0]), int(size[1])), gray, norm


def list_image_zip(path: Path) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """``({"train"|"val": [(member, class_name)]}, classes)`` of an image-folder zip."""
    if not path.is_file():
        raise dataset_error(f"dataset file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise dataset_error("cannot read image folder as a zip archive: File is not a zip file")
    infos = refuse_unsafe_zip(path, "invalid_dataset", "the image folder")
    images = [i for i in infos if not i.is_dir() and i.filename.lower().endswith(IMAGE_SUFFIXES)
              and "__MACOSX" not in i.filename and not Path(i.filename).name.startswith(".")]
    for info in images:
        if info.file_size > MAX_IMAGE_BYTES:
            raise dataset_error(f"image {info.filename!r} is {info.file_size} bytes, more than the limit of "
                       f"{MAX_IMAGE_BYTES} bytes per image")
    files = [i.filename for i in images]
    if not files:
        raise dataset_error("the zip holds no images (expected <class>/<image>.png|jpg)")
    parts = [n.split("/") for n in files]
    # Strip one common top-level folder ("digits/0/a.png").
    while all(len(p) > 2 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    if any(len(p) not in (2, 3) for p in parts):
        raise dataset_error("images must be laid out as <class>/<image> (optionally under train/ and val/)")
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    tops = {p[0] for p in parts}
    three = all(len(p) == 3 for p in parts)
    if three and tops <= {"train", "val", "test"} and "train" in tops:
        for member, p in zip(files, parts):
            splits["train" if p[0] == "train" else "val"].append((member, p[1]))
    elif all(len(p) == 2 for p in parts):
        splits["train"] = [(member, p[0]) for member, p in zip(files, parts)]
    else:
        raise dataset_error("images must be laid out as <class>/<image> (optionally under train/ and val/)")
    classes = sorted({c for lst in splits.values() for _, c in lst})
    for lst in splits.values():
        lst.sort()
    return splits, classes


def check_image_pixels(img: Any, member: str) -> None:
    """Refuse an opened (not yet decoded) PIL image with more than MAX_IMAGE_PIXELS pixels."""
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise dataset_error(f"image {member!r} declares {width}×{height} pixels, more than the limit of "
                   f"{MAX_IMAGE_PIXELS} pixels per image")


@dataset_formats.register("image_folder")
class ImageFolderDataset(DatasetFormat):
    """A zip of ``<class>/<image>``; labels are the sorted class names; images float32 N×C×H×W."""

    def load(self, path: Path, inputs: tuple[str, ...], options: dict, cache_dir: Path | None) -> Dataset:
        from PIL import Image

        size, gray, norm = image_options(options)
        splits, classes = list_image_zip(path)
        index = {c: i for i, c in enumerate(classes)}
        channels = 1 if gray else 3

        def decode(zf: zipfile.ZipFile, items: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
            x = np.empty((len(items), channels, size[0], size[1]), dtype=np.float32)
            y = np.empty(len(items), dtype=np.int64)
            for i, (member, cls) in enumerate(items):
                try:
                    with Image.open(io.BytesIO(zf.read(member))) as img:
                        check_image_pixels(img, member)  # before decoding: the header alone gives the size
                        img = img.convert("L" if gray else "RGB")
                        if img.size != (size[1], size[0]):
                            img = img.resize((size[1], size[0]), Image.BILINEAR)
                        a = np.asarray(img, dtype=np.float32) / 255.0
                except EngineError:
                    raise
                except Exception as exc:
                    raise dataset_error(f"cannot decode image {member!r}: {first_line(exc)}") from None
                x[i] = a[None] if gray else a.transpose(2, 0, 1)
                y[i] = index[cls]
            return x, y

        if len(inputs) != 1:
            raise dataset_error(f"an image folder has one input (the images); got inputs {list(inputs)}")
        with zipfile.ZipFile(path) as zf:
            x, y = decode(zf, splits["train"])
            val = decode(zf, splits["val"]) if splits["val"] else None
        if norm != "none":
            if norm == "dataset":
                mean = x.mean(axis=(0, 2, 3))
                std = x.std(axis=(0, 2, 3)) + 1e-6
            else:
                mean = np.array(IMAGENET_MEAN if not gray else [float(np.mean(IMAGENET_MEAN))], dtype=np.float32)
                std = np.array(IMAGENET_STD if not gray else [float(np.mean(IMAGENET_STD))], dtype=np.float32)
            shape = (1, channels, 1, 1)
            x = (x - mean.reshape(shape)) / std.reshape(shape)
            if val is not None:
                val = ((val[0] - mean.reshape(shape)) / std.reshape(shape), val[1])
        name = inputs[0]
        ds = check_dataset([name], {name: x}, y, {name: None if val is None else val[0]},
                           None if val is None else val[1])
        ds.classes = classes
        return ds
