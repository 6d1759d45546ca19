"""Data as batches: in-memory tensors ``(X, y)`` (the fast path) or any re-iterable of
``(inputs, targets)`` batches, such as a ``torch.utils.data.DataLoader``.

Every function that reads data (training, evaluation, gradients, the post-hoc
estimators) takes either form and holds one batch at a time, so memory is bounded by
the batch, not the dataset. The two forms give the same numbers on the same rows in
the same order (tested).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from numbers import Integral

import torch
from torch import Tensor

from mustat._checks import check_scalar

#: ``(X, y)`` tensors, or a re-iterable of ``(inputs, targets)`` batches (a DataLoader, a list)
Data = tuple[Tensor, Tensor] | Iterable


def is_tensors(data: object) -> bool:
    """Whether ``data`` is the in-memory form ``(X, y)``."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)


def check_data(data: object, argname: str = "data") -> None:
    """A clear error for anything that is neither ``(X, y)`` tensors nor a re-iterable of batches."""
    if is_tensors(data):
        X, y = data
        if len(X) != len(y):
            raise ValueError(f"{argname}: X has {len(X)} rows but y has {len(y)}")
        return
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError(f"{argname} must be (X, y) tensors or an iterable of (inputs, targets) batches such as a "
                        f"DataLoader, got {type(data).__name__}")
    if iter(data) is data:
        raise TypeError(f"{argname} is an iterator ({type(data).__name__}), which can be read only once; pass a "
                        "DataLoader or a list of batches, which can be read again")


def batches(data: Data, batch_size: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """The ``(inputs, targets)`` batches of ``data``: chunks of ``batch_size`` rows in order for
    tensors (default: one chunk), the iterable's own batches otherwise."""
    check_data(data)
    if is_tensors(data):
        X, y = data
        size = len(y) if batch_size is None else int(check_scalar(batch_size, "batch_size", kind=Integral, low=1))
        for start in range(0, len(y), max(size, 1)):
            yield X[start : start + size], y[start : start + size]
        return
    for i, item in enumerate(data):
        if not (isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[1], Tensor)):
            raise TypeError(f"batch {i} of the data is a {type(item).__name__}; each batch must be (inputs, targets) "
                            "with targets a tensor, as a DataLoader over a TensorDataset gives")
        yield item[0], item[1]


def count(data: Data) -> int:
    """The number of samples: ``len(y)``, the DataLoader's ``len(dataset)``, or the rows of one pass."""
    if is_tensors(data):
        return len(data[1])
    dataset = getattr(data, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    return sum(len(y) for _, y in batches(data))


def gather(data: Data, *, max_rows: int = 10_000_000) -> tuple[Tensor, Tensor]:
    """All rows in memory as ``(X, y)``, for methods that resample the whole dataset (the
    bootstrap); refuses more than ``max_rows`` rows."""
    if is_tensors(data):
        return data[0], data[1]
    xs, ys, rows = [], [], 0
    for xb, yb in batches(data):
        if not isinstance(xb, Tensor):
            raise TypeError("gathering the data needs tensor inputs in every batch")
        rows += len(yb)
        if rows > max_rows:
            raise ValueError(f"the data has more than max_rows={max_rows} rows, too many to hold in memory here")
        xs.append(xb)
        ys.append(yb)
    if not xs:
        raise ValueError("the data has no batches")
    return torch.cat(xs), torch.cat(ys)
