import gzip
import pickle

import numpy as np
import pytest
import torch

from mustat import data
from mustat.data import glm_design, load, read_cifar_batch, read_idx


def write_idx(path, array, code=0x08):
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(payload)


def write_mnist(folder, n_train=200, n_test=20, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    imgs = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    labels = np.arange(n_train, dtype=np.uint8) % 10
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", imgs)
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", labels)
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", imgs[:n_test])
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", labels[:n_test])
    return imgs, labels


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    a = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    p = tmp_path / ("x.idx.gz" if gz else "x.idx")
    write_idx(p, a)
    np.testing.assert_array_equal(read_idx(p), a)
    f = np.random.default_rng(1).standard_normal((3, 2)).astype(np.float32)
    write_idx(tmp_path / "f.idx", f, code=0x0D)
    np.testing.assert_array_equal(read_idx(tmp_path / "f.idx"), f)


def test_idx_corrupted_and_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.idx"):
        read_idx(tmp_path / "nope.idx")
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 10)
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(bad)
    a = np.zeros((10, 4), dtype=np.uint8)
    write_idx(tmp_path / "t.idx", a)
    truncated = tmp_path / "t.idx"
    truncated.write_bytes(truncated.read_bytes()[:-5])
    with pytest.raises(ValueError, match="corrupted: shape \\(10, 4\\) needs 40"):
        read_idx(truncated)
    notgz = tmp_path / "x.idx.gz"
    notgz.write_bytes(b"plain bytes")
    with pytest.raises(ValueError, match="not a readable gzip"):
        read_idx(notgz)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_from_data_dir(tmp_path, gz):
    imgs, labels = write_mnist(tmp_path, gz=gz)
    d = load("fashion_mnist", data_dir=tmp_path, seed=0)
    assert d.input_shape == (1, 28, 28) and d.n_classes == 10
    assert len(d.y_train) + len(d.y_val) == 200 and len(d.y_test) == 20
    assert abs(float(d.X_train.mean())) < 1e-5 and abs(float(d.X_train.std()) - 1) < 1e-2
    assert sorted(torch.cat([d.y_train, d.y_val]).tolist()) == sorted(labels.tolist())


def test_mnist_dir_without_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks the mnist IDX files"):
        load("mnist", data_dir=tmp_path)
    with pytest.raises(ValueError, match="pass data_dir"):
        load("mnist")


def test_cifar_batches(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 10, 20))}, fh)
    imgs, labels = read_cifar_batch(folder / "test_batch")
    assert imgs.shape == (20, 3, 32, 32) and labels.shape == (20,)
    d = load("cifar10", data_dir=tmp_path)
    assert d.input_shape == (3, 32, 32) and len(d.y_test) == 20 and len(d.y_train) + len(d.y_val) == 100
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3 is not a CIFAR-10 python batch"):
        load("cifar10", data_dir=tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load("cifar10", data_dir=tmp_path)


def test_standardisation_uses_training_split_only():
    d = load("breast_cancer", seed=3)
    torch.testing.assert_close(d.X_train.mean(0), torch.zeros(30), atol=1e-5, rtol=0)
    assert float(d.X_test.mean(0).abs().max()) > 1e-3  # other splits are not centred on themselves
    a, b = load("breast_cancer", seed=3), load("breast_cancer", seed=4)
    assert torch.equal(a.y_test, b.y_test) and not torch.equal(a.y_val, b.y_val)  # fixed test, seeded val


def test_bundled_and_extra_datasets():
    d = load("digits")
    assert d.input_shape == (1, 8, 8) and len(d.y_test) == 450
    m = load("mnist5k")
    assert m.input_shape == (1, 28, 28) and len(m.y_test) == 1000 and len(m.y_train) + len(m.y_val) == 4000
    assert torch.bincount(m.y_test).min() >= 90  # stratified
    one = load("mnist1d")
    assert one.input_shape == (40,) and len(one.y_test) == 1000


def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError, match="digits"):
        load("imagenet")


def test_glm_design_truth():
    X, y, truth = glm_design("linear", n=20000, coef=(2.0, 0.0, -1.0), scales=(1, 3, 0.5), seed=0)
    beta = np.linalg.lstsq(np.c_[np.ones(len(X)), X], y, rcond=None)[0]
    # OLS SE here is ~1/(sqrt(n) * scale) <= 0.015: 5 SE margins
    np.testing.assert_allclose(beta[1:], truth["coef"], atol=0.05)
    np.testing.assert_allclose(X.std(0), [1, 3, 0.5], rtol=0.03)
    assert set(np.unique(glm_design("softmax", n=500, seed=1)[1])) == {0, 1, 2}
    assert "synthetic-logistic" in data.DATASETS


def test_correlated_normal_is_portable_and_has_the_covariance():
    # an equicorrelated covariance has a six-fold repeated eigenvalue: numpy's SVD draws move by
    # units under a 1e-15 perturbation, Cholesky draws by rounding amounts
    d = 7
    cov = np.full((d, d), 0.3) + 0.7 * np.eye(d)
    bumped = cov + 1e-15 * np.eye(d)
    a = data.correlated_normal(np.random.default_rng(1), cov, 20_000)
    b = data.correlated_normal(np.random.default_rng(1), bumped, 20_000)
    assert np.abs(a - b).max() < 1e-12
    svd_a = np.random.default_rng(1).multivariate_normal(np.zeros(d), cov, 20_000)
    svd_b = np.random.default_rng(1).multivariate_normal(np.zeros(d), bumped, 20_000)
    assert np.abs(svd_a - svd_b).max() > 1.0           # the failure this guards against, on this platform
    # the sample covariance's entries have SD about (1 + rho^2)^0.5 / sqrt(n) < 0.008; 5 SDs
    assert np.abs(np.cov(a.T) - cov).max() < 0.04


def test_glm_design_draws_the_same_data_under_a_perturbed_correlation():
    X, y, _ = glm_design("logistic", n=2000, coef=(1.0, -0.5, 0.0, 0.25), corr=0.3, seed=4)
    X2, y2, _ = glm_design("logistic", n=2000, coef=(1.0, -0.5, 0.0, 0.25), corr=0.3 + 1e-15, seed=4)
    assert np.abs(X - X2).max() < 1e-12 and (y == y2).all()


def test_correlated_normal_refuses_a_covariance_that_is_not_positive_definite():
    with pytest.raises(ValueError, match="positive definite"):
        data.correlated_normal(np.random.default_rng(0), np.array([[1.0, 2.0], [2.0, 1.0]]), 5)
    with pytest.raises(ValueError, match=r"corr=-0.5 .* allowed: -0.2 < corr < 1"):
        glm_design("linear", coef=(1.0, 0.0, 0.0, 0.0, 0.0, 0.0), corr=-0.5)
