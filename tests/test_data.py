import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from poisonguard.data import LabeledData, check_scannable, load_dataset, load_npz, load_shared
from poisonguard.errors import DataError, IntegrityError


def test_labeled_data_defaults_and_fingerprint() -> None:
    d = LabeledData.create(np.zeros((4, 3, 3), np.uint8), [0, 1, 0, 1])
    assert d.ids.tolist() == [0, 1, 2, 3]
    assert d.n_classes == 2 and d.is_image
    assert d.fingerprint() == LabeledData.create(np.zeros((4, 3, 3), np.uint8),
                                                 [0, 1, 0, 1]).fingerprint()
    assert d.subset(np.array([1, 3])).ids.tolist() == [1, 3]


@pytest.mark.parametrize("x,y,match", [
    (np.zeros((3, 4)), [0, 1], "3 samples but y has 2"),
    (np.full((2, 4), np.nan), [0, 1], "NaN or inf"),
    (np.zeros((0, 4)), [], "empty"),
    (np.zeros((2, 4)), [0.5, 1], "non-integer"),
    (np.zeros((2, 4)), [-1, 1], "negative"),
    (np.zeros((2, 3, 3, 7)), [0, 1], "NHWC"),
    (np.array([["a"], ["b"]], dtype=object), [0, 1], "dtype"),
])
def test_bad_arrays_are_named(x: np.ndarray, y: list, match: str) -> None:
    with pytest.raises(DataError, match=match):
        LabeledData.create(x, np.array(y))


def test_duplicate_ids_rejected() -> None:
    with pytest.raises(DataError, match="unique"):
        LabeledData.create(np.zeros((2, 2)), [0, 1], ids=np.array([5, 5]))


def test_check_scannable() -> None:
    with pytest.raises(DataError, match="only one class"):
        check_scannable(LabeledData.create(np.zeros((10, 2)), np.zeros(10, int)))
    with pytest.raises(DataError, match="fewer than 5"):
        check_scannable(LabeledData.create(np.zeros((12, 2)), np.array([0] * 9 + [1] * 3)))


def test_npz_keys_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "a.npz"
    np.savez(p, x_train=np.zeros((6, 2)), y_train=np.arange(6) % 2, x_test=np.ones((2, 2)),
             y_test=[0, 1])
    assert len(load_npz(p)) == 6 and len(load_npz(p, split="test")) == 2
    empty = tmp_path / "e.npz"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_npz(empty)
    wrong = tmp_path / "w.npz"
    np.savez(wrong, a=np.zeros(3))
    with pytest.raises(DataError, match="expected 'x' and 'y'"):
        load_npz(wrong)
    junk = tmp_path / "j.npz"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="not a readable"):
        load_npz(junk)
    obj = tmp_path / "o.npz"
    np.savez(obj, x=np.array([{"a": 1}, {"b": 2}], dtype=object), y=[0, 1])
    with pytest.raises(DataError, match="unpickling"):
        load_npz(obj)
    with pytest.raises(DataError, match="no such file"):
        load_npz(tmp_path / "missing.npz")


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((5, 5, 3), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    d = load_dataset(tmp_path)
    assert d.x.shape == (6, 5, 5, 3) and d.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert d.ids[0] == "cat/0.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "dog" / "odd.png")
    with pytest.raises(DataError, match="differs"):
        load_dataset(tmp_path)


def _idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def test_mnist_idx_and_cifar_binary_layouts(tmp_path: Path) -> None:
    mn = tmp_path / "mnist"
    mn.mkdir()
    _idx(mn / "train-images-idx3-ubyte.gz", np.arange(3 * 28 * 28).reshape(3, 28, 28) % 255)
    _idx(mn / "train-labels-idx1-ubyte.gz", np.array([1, 2, 3]))
    d = load_shared("mnist", tmp_path)
    assert d.x.shape == (3, 28, 28) and d.y.tolist() == [1, 2, 3]
    cf = tmp_path / "cifar"
    cf.mkdir()
    rows = np.zeros((2, 3073), np.uint8)
    rows[:, 0] = [4, 7]
    rows[1, 1:1025] = 200  # red plane of the second image
    rows.tofile(cf / "data_batch_1.bin")
    c = load_dataset(cf)
    assert c.x.shape == (2, 32, 32, 3) and c.y.tolist() == [4, 7]
    assert c.x[1, 0, 0].tolist() == [200, 0, 0]


def test_shared_sha_mismatch(tmp_path: Path) -> None:
    (tmp_path / "mnist").mkdir()
    np.savez(tmp_path / "mnist" / "mnist.npz", x_train=np.zeros((4, 28, 28), np.uint8),
             y_train=[0, 1, 0, 1])
    (tmp_path / "SHA256SUMS").write_text("0" * 64 + "  mnist/mnist.npz\n")
    with pytest.raises(IntegrityError, match="sha256"):
        load_shared("mnist", tmp_path)
    assert len(load_shared("mnist", tmp_path, verify=False)) == 4


SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.mark.skipif(not (SHARED / "SHA256SUMS").exists(), reason="shared datasets absent")
def test_shared_cifar_exact_subset_verifies() -> None:
    d = load_shared("cifar10_exact", SHARED, split="test")
    assert d.x.shape == (1017, 32, 32, 3) and d.x.dtype == np.uint8


def test_builtin_digits(digits: tuple) -> None:
    train, test = digits
    assert train.x.shape[1:] == (8, 8) and train.x.dtype == np.uint8
    assert len(train) + len(test) == 1797
    assert not set(train.ids.tolist()) & set(test.ids.tolist())
