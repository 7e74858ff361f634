"""Loaders: .npz, image folders, MNIST idx / CIFAR-10 binary layouts, the shared datasets,
and scikit-learn's built-in digits. Every loader returns validated :class:`LabeledData`."""

from __future__ import annotations

import gzip
import hashlib
import struct
import zipfile
from pathlib import Path

import numpy as np

from poisonguard.data.labeled import LabeledData
from poisonguard.errors import DataError, IntegrityError

SHARED_FILES = {
    "mnist": "mnist/mnist.npz",
    "fashion_mnist": "fashion_mnist/fashion_mnist.npz",
    "cifar10": "cifar10/cifar10_jpeg_decoded.npz",
    "cifar10_exact": "cifar10/cifar10_exact_subset.npz",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}


def load_npz(path: str | Path, split: str = "train") -> LabeledData:
    """Load ``x``/``y`` (or ``x_train``/``y_train``, ``x_test``/``y_test``) from an .npz file.

    ``split`` selects train or test when both are present; plain ``x``/``y`` serves either,
    except that ``split="test"`` prefers ``x_test``/``y_test`` over ``x``/``y`` (the file
    ``poisonguard attack --test`` writes holds both).
    Object arrays are refused (``allow_pickle=False``). An optional ``ids`` key is honoured.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; expected an .npz file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty; expected an .npz archive")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a readable .npz archive (no zip structure); save it with "
                        "numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            if split == "test" and {"x_test", "y_test"} <= keys:
                # a file `attack --test` wrote holds the training set as x/y: the test keys win
                xk, yk, ik = "x_test", "y_test", "ids_test"
            elif {"x", "y"} <= keys:
                xk, yk, ik = "x", "y", "ids"
            elif {f"x_{split}", f"y_{split}"} <= keys:
                xk, yk, ik = f"x_{split}", f"y_{split}", f"ids_{split}"
            else:
                raise DataError(
                    f"{path}: keys {sorted(keys)}; expected 'x' and 'y', or "
                    f"'x_{split}' and 'y_{split}'"
                )
            x, y = archive[xk], archive[yk]
            ids = archive[ik] if ik in keys else None
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({exc})") from None
    except ValueError as exc:
        raise DataError(f"{path}: cannot read arrays without unpickling ({exc}); store numeric "
                        "arrays only") from None
    return LabeledData.create(x, y, ids, name=str(path))


def load_image_folder(root: str | Path) -> LabeledData:
    """Load ``root/<class_name>/*.png`` (one sub-folder per class, sorted names -> labels 0..K-1).

    All images must share one size; greyscale stays NHW, colour becomes NHWC RGB uint8.
    """
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory of class sub-folders")
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root}: no class sub-folders found; expected root/<class>/<image>")
    xs, ys, ids = [], [], []
    shape = None
    for label, cdir in enumerate(classes):
        for f in sorted(cdir.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    arr = np.asarray(im.convert("L" if im.mode in ("L", "1") else "RGB"))
            except Exception as exc:  # noqa: BLE001 - PIL raises many types
                raise DataError(f"{f}: cannot be read as an image ({exc})") from None
            if shape is None:
                shape = arr.shape
            elif arr.shape != shape:
                raise DataError(f"{f}: image shape {arr.shape} differs from {shape}; resize all "
                                "images to one size first")
            xs.append(arr)
            ys.append(label)
            ids.append(f"{cdir.name}/{f.name}")
    if not xs:
        raise DataError(f"{root}: no images with suffixes {sorted(IMAGE_SUFFIXES)}")
    return LabeledData.create(np.stack(xs), np.array(ys), np.array(ids), name=str(root))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte idx file")
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated idx file ({data.size} of {np.prod(dims)} values)")
    return data.reshape(dims)


def _load_mnist_idx(root: Path, split: str) -> LabeledData | None:
    prefix = "train" if split == "train" else "t10k"
    for suffix in ("", ".gz"):
        xi = root / f"{prefix}-images-idx3-ubyte{suffix}"
        yi = root / f"{prefix}-labels-idx1-ubyte{suffix}"
        if xi.exists() and yi.exists():
            return LabeledData.create(_read_idx(xi), _read_idx(yi).astype(np.int64),
                                      name=str(root))
    return None


def _load_cifar_bin(root: Path, split: str) -> LabeledData | None:
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    files = [root / n for n in names if (root / n).exists()]
    if not files:
        return None
    rows = np.concatenate([np.fromfile(f, dtype=np.uint8).reshape(-1, 3073) for f in files])
    x = rows[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return LabeledData.create(np.ascontiguousarray(x), rows[:, 0].astype(np.int64),
                              name=str(root))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_shared(name: str, root: str | Path, split: str = "train",
                verify: bool = True) -> LabeledData:
    """Load a dataset from a ``shared/datasets``-style root, checking ``SHA256SUMS`` if present.

    ``name`` is one of ``mnist``, ``fashion_mnist``, ``cifar10`` (the 20k JPEG-decoded subset) or
    ``cifar10_exact``. Also accepts a user's copy in the standard layouts: MNIST idx files
    (``train-images-idx3-ubyte[.gz]``) or CIFAR-10 binary batches (``data_batch_N.bin``) in
    ``root`` or ``root/<name>``.
    """
    if name not in SHARED_FILES:
        raise DataError(f"unknown dataset {name!r}; expected one of {sorted(SHARED_FILES)}")
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; expected 'train' or 'test'")
    root = Path(root)
    rel = SHARED_FILES[name]
    path = root / rel
    if path.exists():
        sums = root / "SHA256SUMS"
        if verify and sums.exists():
            expected = {}
            for line in sums.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2:
                    expected[parts[1].lstrip("*")] = parts[0]
            if rel in expected and _sha256(path) != expected[rel]:
                raise IntegrityError(f"{path}: sha256 does not match SHA256SUMS; the file changed "
                                     "since it was pinned, re-fetch it")
        return load_npz(path, split=split)
    for candidate in (root, root / name):
        loaded = (_load_mnist_idx(candidate, split) if "mnist" in name
                  else _load_cifar_bin(candidate, split))
        if loaded is not None:
            return loaded
    raise DataError(f"{root}: found neither {rel} nor the standard {name} layout")


def load_builtin_digits() -> tuple[LabeledData, LabeledData]:
    """scikit-learn's 8x8 handwritten digits (1797 images) as uint8 images, split 75/25 (seeded)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.clip(digits.images * 16.0, 0, 255).astype(np.uint8)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    cut = int(0.75 * len(y))
    tr, te = order[:cut], order[cut:]
    return (LabeledData.create(x[tr], y[tr], tr, name="digits"),
            LabeledData.create(x[te], y[te], te, name="digits-test"))


def load_dataset(spec: str | Path, split: str = "train") -> LabeledData:
    """Load from a path: an .npz file, an image-folder tree, or an idx/CIFAR-binary folder."""
    path = Path(spec)
    if path.suffix == ".npz" or path.is_file():
        return load_npz(path, split=split)
    if path.is_dir():
        for loader in (_load_mnist_idx, _load_cifar_bin):
            loaded = loader(path, split)
            if loaded is not None:
                return loaded
        return load_image_folder(path)
    raise DataError(f"{path}: no such file or directory")
