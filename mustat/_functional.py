"""The one functional view of a (pruned) model that every estimator and writer uses.

:class:`FunctionalModel` holds a snapshot of the model's *effective* tensors (masks
applied) and calls the model with any values in their place through
``torch.func.functional_call``, so ``torch.func.grad``, ``vmap`` and ``hessian`` work on
it. Masked entries are held at zero (the mask multiplies whatever values are passed, so
their gradient is zero too), a tied tensor is one entry passed to every place it is used,
frozen tensors can be differentiated like any other, and everything can be cast to
another dtype or device. No module is deep-copied or finalized, which is what made
parametrized LSTMs and tied weights fail before (``copy.deepcopy`` cannot copy the
non-leaf weights an RNN caches). The model itself is never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mustat import _masking as M
from mustat._params import Entry, entries, entry, trainable_names


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run with every submodule in eval mode; each module's own flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@dataclass(frozen=True)
class Layout:
    """Where the free (unmasked) entries of some tensors sit in one flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    free: tuple[Tensor, ...]  # flat indices of each tensor's unmasked entries

    def size(self) -> int:
        return sum(len(i) for i in self.free)

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([tensors[n].reshape(-1)[i.to(tensors[n].device)] for n, i in zip(self.names, self.free)])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Tensors with the stored shapes, masked entries 0 (differentiable in ``theta``)."""
        out, start = {}, 0
        for name, shape, idx in zip(self.names, self.shapes, self.free):
            full = theta.new_zeros(shape.numel()).index_put((idx.to(theta.device),), theta[start : start + len(idx)])
            out[name] = full.view(shape)
            start += len(idx)
        return out


class FunctionalModel:
    """A model's effective tensors, and a call that takes other values in their place.

    Parameters
    ----------
    model
        The network; read, never modified.
    dtype, device
        Cast every floating tensor (parameters and buffers) to this dtype and move
        everything to this device (default: as they are). Inputs are the caller's to cast.

    Notes
    -----
    ``fm.params(names)`` gives the effective values (masks applied), detached;
    ``fm(values, *args)`` runs the forward pass with ``values`` (a dict keyed by tensor
    name, any subset) in place of those tensors and the snapshot for all others. The
    model's train/eval mode is used as it is: wrap calls in :func:`eval_mode` for
    per-sample-independent outputs.
    """

    def __init__(self, model: nn.Module, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        self.model = model
        self.table: dict[str, Entry] = entries(model)
        self.dtype, self.device = dtype, device
        self._state = {k: self._cast(v.detach()) for k, v in model.named_parameters(remove_duplicate=False)}
        self._state.update({k: self._cast(v) for k, v in model.named_buffers(remove_duplicate=False)})
        self._pruned_places = [(s.module, s.attr) for e in self.table.values() for s in e.places()
                               if M.kind(s.module, s.attr) == "torch-prune"]
        self._masks: dict[str, Tensor | None] = {}
        for name, e in self.table.items():
            m = e.mask()
            # a snapshot: the mask buffer is tightened in place by a later prune, and a cast to its own
            # dtype and device would alias it (the compensating update reads what was cut since)
            self._masks[name] = None if m is None else self._cast(m.detach().clone())

    def _cast(self, t: Tensor) -> Tensor:
        dtype = self.dtype if (self.dtype is not None and t.is_floating_point()) else t.dtype
        return t.to(device=self.device if self.device is not None else t.device, dtype=dtype)

    def name(self, name: str) -> str:
        """The first name of the tensor called ``name``."""
        return entry(self.model, name, self.table).name

    def trainable(self) -> list[str]:
        return trainable_names(self.model)

    def mask(self, name: str) -> Tensor | None:
        """The keep-mask (0/1 in the view's dtype) of ``name``, or None."""
        return self._masks[self.name(name)]

    def free(self, name: str) -> Tensor:
        """Flat indices of the unmasked entries of ``name`` (on the CPU)."""
        m = self._masks[self.name(name)]
        e = self.table[self.name(name)]
        n = getattr(e.module, e.attr).numel()
        return torch.arange(n) if m is None else torch.nonzero(m.reshape(-1).cpu() != 0).flatten()

    def params(self, names: Iterable[str] | None = None) -> dict[str, Tensor]:
        """Effective values (masks applied), detached, cast; default: every trainable tensor."""
        names = self.trainable() if names is None else [self.name(n) for n in names]
        return {n: self._cast(self.table[n].effective()) for n in names}

    def layout(self, names: Iterable[str]) -> Layout:
        names = [self.name(n) for n in names]
        shapes = tuple(getattr(self.table[n].module, self.table[n].attr).shape for n in names)
        return Layout(tuple(names), shapes, tuple(self.free(n) for n in names))

    def state(self, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The ``functional_call`` dict with ``values`` (masked) in place of their tensors."""
        state = dict(self._state)
        for name, value in values.items():
            e = self.table[name]
            m = self._masks[name]
            if m is not None:
                value = value * m
            for s in e.slots:
                if s.key is None:
                    raise ValueError(f"{s.path!r} is computed by a parametrization mustat cannot see through; "
                                     "it can only be held fixed")
                state[s.key] = value
        return state

    def __call__(self, values: Mapping[str, Tensor], *args, **kwargs):
        # torch.nn.utils.prune's pre-hook writes the computed weight onto its module during the call;
        # the module's own value is put back, so no traced or batched tensor outlives the call
        computed = [(m, a, m.__dict__.get(a)) for m, a in self._pruned_places]
        try:
            with differentiable():
                return functional_call(self.model, self.state(values), args, kwargs, tie_weights=False, strict=False)
        finally:
            for module, attr, value in computed:
                setattr(module, attr, value)


@contextmanager
def differentiable() -> Iterator[None]:
    """Run attention on composite kernels that ``torch.func`` can differentiate to any order and
    batch: torch's fused attention paths (the ``nn.TransformerEncoderLayer`` / ``MultiheadAttention``
    fast path in eval mode, flash scaled-dot-product attention) have no forward-mode or double
    derivatives and no batching rules. The fast-path switch is process-wide in torch, so it is
    set for the call and restored."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def _no_batching_rule(err: Exception) -> bool:
    text = str(err)
    # the last: torch's LSTM on float64 writes in place into an unbatched buffer under vmap
    return ("Batching rule not implemented" in text or "vmap" in text and "not supported" in text
            or "doesn't match the broadcast shape" in text)


def vmap_or_loop(fn, in_dims=0):
    """``torch.func.vmap(fn, in_dims)``, falling back to a Python loop over the mapped dimension
    (stacking the results) for ops without a batching rule, such as torch's fused LSTM and GRU
    kernels: the same numbers, slower."""
    mapped = torch.func.vmap(fn, in_dims=in_dims)

    def call(*args):
        try:
            return mapped(*args)
        except (RuntimeError, NotImplementedError) as err:
            if not _no_batching_rule(err):
                raise
        dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
        size = next(_leading(a) for a, d in zip(args, dims) if d is not None)
        outs = [fn(*[a if d is None else _index(a, i) for a, d in zip(args, dims)]) for i in range(size)]
        return _stack(outs)

    return call


def _leading(a):
    if isinstance(a, Tensor):
        return a.shape[0]
    return _leading(next(iter(a.values())) if isinstance(a, Mapping) else a[0])


def _index(a, i):
    if isinstance(a, Tensor):
        return a[i]
    if isinstance(a, Mapping):
        return {k: _index(v, i) for k, v in a.items()}
    return type(a)(_index(v, i) for v in a)


def _stack(outs):
    first = outs[0]
    if isinstance(first, Tensor):
        return torch.stack(outs)
    if isinstance(first, Mapping):
        return {k: _stack([o[k] for o in outs]) for k in first}
    return type(first)(_stack(list(z)) for z in zip(*outs))


def hessian(fn, argnums: int = 0):
    """The Hessian by reverse-over-reverse differentiation (``jacrev(jacrev(fn))``): the same matrix
    as ``torch.func.hessian``'s forward-over-reverse, about twice as fast on small models here,
    and defined for ops without a forward-mode derivative."""
    return torch.func.jacrev(torch.func.jacrev(fn, argnums=argnums), argnums=argnums)


def clone_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copies modules holding computed, non-leaf weights, which
    ``deepcopy`` refuses: recurrent layers whose weights are parametrized (torch caches them) and
    modules pruned with ``torch.nn.utils.prune`` after a forward pass."""
    memo: dict[int, object] = {}
    for m in model.modules():
        cached = list(getattr(m, "_flat_weights", None) or ())
        # torch.nn.utils.prune leaves its computed (non-leaf) weight as a plain attribute
        cached += [v for v in m.__dict__.values() if isinstance(v, Tensor)]
        for t in cached:
            if isinstance(t, Tensor) and not t.is_leaf:
                memo[id(t)] = t.detach().clone()
    return copy.deepcopy(model, memo)
