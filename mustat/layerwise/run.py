"""The one-shot driver: layers in the order the model calls them, each pruned from calibration
inputs that have passed through the layers already pruned: GPTQ's "true-sequential" order, where
SparseGPT's and Wanda's scripts feed all the layers of a transformer block from that block's inputs
to the pruned blocks before it.

One forward pass over the calibration batches per *group* of layers: layers that read the very
same input tensor (query, key and value; a gated MLP's gate and up projections) share a pass and a
Gram matrix. A pass stops at the first layer of the next group (an exception raised from a
forward pre-hook), so the model is run only as far as it must be. Only the current group's
statistics are held, except with ``scope="global"``, which needs every layer's scores from one pass
over the dense model first to share the sparsity out between layers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mustat._checks import check_option, check_scalar
from mustat._params import entries, install_mask
from mustat.layerwise import solve as S
from mustat.layerwise.layers import Target, find_targets, mha_inputs, mha_values
from mustat.patterns import check_groups, parse_pattern, resolve_sparsity
from mustat.pruning import PruningReport


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layers being measured have their inputs."""


@dataclass
class OneShotReport:
    """What :func:`oneshot` did: one row per pruned tensor (``layers``), the model's counts
    (``pruning``), the tensors left out and why, the forward passes run and the wall time."""

    layers: pd.DataFrame
    pruning: PruningReport
    skipped: list[tuple[str, str]] = field(default_factory=list)
    passes: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        err = self.layers["error"].mean() if len(self.layers) else float("nan")
        return (f"{len(self.layers)} layers pruned one-shot to {self.pruning.sparsity:.1%} in {self.seconds:.1f} s "
                f"({self.passes} forward passes); mean relative reconstruction error {err:.4f}")


def _to(batch, device):
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _call(model: nn.Module, batch, forward: Callable | None):
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])  # (inputs, labels) from a DataLoader
    return model(batch)


def _token_mask(batch) -> Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None


def _tokens(x: Tensor, mask: Tensor | None, seq_first: bool = False) -> Tensor:
    """``x`` as (tokens, features), padding tokens dropped where a mask matches its layout."""
    if mask is not None and x.dim() == 3:
        m = mask.T if seq_first else mask
        if tuple(x.shape[:2]) == tuple(m.shape):
            return x[m]
    return x.reshape(-1, x.shape[-1])


@contextlib.contextmanager
def _inference(model: nn.Module):
    """Eval mode (no dropout) and attention's fused fast path off (it skips the modules whose inputs
    are measured), both put back afterwards."""
    modes = {m: m.training for m in model.modules()}
    fast = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for m, mode in modes.items():
            m.training = mode
        for m in model.modules():  # the masks' parametrizations added meanwhile: the model's mode
            if m not in modes:
                m.training = modes[model]


class _Pass:
    """Hooks that feed the Gram matrices of some targets, and optionally stop at another."""

    def __init__(self, targets: list[Target], sandwich: bool, device: torch.device):
        self.targets, self.sandwich, self.device = targets, sandwich, device
        self.grams: dict[tuple[str, int], S.Gram] = {}
        self.mask: Tensor | None = None
        self.cache: tuple[Tensor, Tensor, Tensor] | None = None
        self.checked: set[int] = set()

    def _add(self, t: Target, part: int, rows: slice, x: Tensor, seq_first: bool = False) -> None:
        # layers share an input only when called one after another: keep the last input's Gram only
        if self.cache is None or self.cache[0] is not x:
            tok = _tokens(x, self.mask, seq_first)
            tok = tok.to(torch.float64 if tok.dtype == torch.float64 else torch.float32)
            xtx = (tok.T @ tok).double()
            if not bool(torch.isfinite(xtx).all()):
                raise ValueError(f"the calibration inputs of {t.name!r} contain NaN or inf; check the model and "
                                 "the batches (a float16 overflow?)")
            self.cache = (x, tok, xtx)
        _, tok, xtx = self.cache
        key = (t.name, part)
        if key not in self.grams:
            self.grams[key] = S.Gram(tok.shape[1], xtx.device, sandwich=self.sandwich)
        W = t.matrix()[rows] if self.sandwich else None
        self.grams[key].add(tok, xtx, W)

    def hooks(self, stop: Target | None) -> list:
        handles = []
        for t in self.targets:
            if t.kind in ("linear", "conv1d"):
                def pre(module, args, kwargs, t=t):
                    x = args[0] if args else next(iter(kwargs.values()))
                    self._add(t, 0, slice(None), x)
                handles.append(t.caller.register_forward_pre_hook(pre, with_kwargs=True))
            elif t.kind == "mha-in":
                def pre(module, args, kwargs, t=t):
                    call = mha_inputs(module, args, kwargs)
                    seq_first = not module.batch_first
                    for i, (rows, source) in enumerate(t.parts):
                        self._add(t, i, rows, call[source], seq_first)
                handles.append(t.caller.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(module, args, kwargs, output, t=t):
                    values = mha_values(module, mha_inputs(module, args, kwargs))
                    if id(module) not in self.checked:
                        self._check(module, values, output[0])
                    self._add(t, 0, slice(None), values, not module.batch_first)
                handles.append(t.caller.register_forward_hook(post, with_kwargs=True))
        if stop is not None:
            def halt(*_):
                raise _Stop
            if stop.kind == "mha-out":
                handles.append(stop.caller.register_forward_hook(halt))
            else:
                handles.append(stop.caller.register_forward_pre_hook(halt))
        return handles

    def _check(self, mha: nn.Module, values: Tensor, output: Tensor) -> None:
        again = mha.out_proj(values)
        if not torch.allclose(again, output, rtol=1e-3, atol=1e-5 * float(output.abs().max()) + 1e-12):
            raise RuntimeError(f"could not recompute the input of {type(mha).__name__}.out_proj from its call "
                               "(a customised attention module?); leave its out_proj out of layers")
        self.checked.add(id(mha))

    def run(self, model, batches, forward, stop: Target | None) -> None:
        handles = self.hooks(stop)
        try:
            for batch in batches:
                self.mask, self.cache = _token_mask(batch), None
                try:
                    _call(model, _to(batch, self.device), forward)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
            self.cache = None


def _trace(model, batch, forward, targets: list[Target], device) -> tuple[list[Target], bool, set[str], list[int]]:
    """Call order of the targets on one batch, whether each is called once (so passes may stop
    early), the targets never reached, and an id of each one's input (negative: not shared)."""
    order: list[tuple[Target, int]] = []
    calls: dict[str, int] = {}
    keep: list[Tensor] = []
    handles = []
    for t in targets:
        def seen(x, t=t):
            calls[t.name] = calls.get(t.name, 0) + 1
            if calls[t.name] == 1:
                keep.append(x)
                order.append((t, id(x) if t.kind in ("linear", "conv1d") else -len(order) - 1))
        if t.kind == "mha-out":
            handles.append(t.caller.register_forward_hook(lambda m, a, o, seen=seen: seen(o)))
        else:
            handles.append(t.caller.register_forward_pre_hook(
                lambda m, a, k, seen=seen: seen(a[0] if a else next(iter(k.values()))), with_kwargs=True))
    try:
        _call(model, _to(batch, device), forward)
    finally:
        for h in handles:
            h.remove()
    once = all(c == 1 for c in calls.values())
    return [t for t, _ in order], once, {t.name for t in targets} - set(calls), [i for _, i in order]


def _groups(order: list[Target], inputs: list[int], once: bool) -> list[list[Target]]:
    if not once:
        return [[t] for t in order]
    groups: list[list[Target]] = []
    for j, (t, i) in enumerate(zip(order, inputs)):
        if groups and i >= 0 and inputs[j - 1] == i:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def _matrix(t: Target) -> tuple[Tensor, Tensor]:
    return t.matrix().to(torch.float64), t.alive()


def oneshot(
    model: nn.Module,
    calibration: Iterable | None,
    *,
    method: str = "sparsegpt",
    sparsity: float | None = None,
    pattern: str = "unstructured",
    scope: str | None = None,
    update: bool | None = None,
    damping: float = 0.01,
    sigma: str = "row",
    block_size: int = 128,
    layers: Iterable[str] | None = None,
    exclude: Iterable[str] = ("lm_head",),
    forward: Callable | None = None,
    progress: bool = False,
) -> OneShotReport:
    """Prune a trained model once, layer by layer, from a few calibration batches (no training).

    Parameters
    ----------
    model
        Any module with ``nn.Linear``, ``transformers``' ``Conv1D`` (GPT-2) or
        ``nn.MultiheadAttention`` layers (:mod:`mustat.layerwise.layers`); masks are installed and,
        with ``update``, the kept weights changed, in place. Its train/eval mode is restored.
    calibration
        Batches, iterated once per group of layers (a list, a DataLoader; an iterator is read into a
        list first). A batch is a tensor (``model(batch)``), a tuple or list whose first element
        is the input (``model(batch[0])``: a DataLoader's ``(inputs, labels)``), or a dict of
        tokenised inputs (``model(**batch)``; tokens where its ``attention_mask`` is 0 are left out
        of the statistics). ``None`` only for ``method="magnitude"`` without update.
    method
        ``magnitude``, ``wanda``, ``sparsegpt``, ``mu`` or ``mu-sandwich``
        (:mod:`mustat.layerwise.solve` states each statistic).
    sparsity
        Fraction of each pruned tensor's weights set to zero, in [0, 1); implied by an N:M pattern.
    pattern
        ``"unstructured"`` or ``"N:M"`` (``"2:4"``: at most 2 kept in every 4 consecutive inputs of a row).
    scope
        Where weights compete: ``row`` (each output row pruned to ``sparsity``: Wanda's choice),
        ``layer`` (each layer; for ``sparsegpt``, each block of columns over all rows, the
        paper's rule) or ``global`` (the sparsity shared out between layers by the scores of the
        dense model). ``None``: ``layer`` for ``sparsegpt``, ``row`` for the others. An N:M pattern
        fixes every group, so only ``row`` applies (and is the default).
    update
        Apply OBS's compensating update to the kept weights (SparseGPT's sweep). ``None``: on for
        ``sparsegpt``, off for the others.
    damping
        Added to the Gram matrix's diagonal as a fraction of its mean (SparseGPT's 0.01).
    sigma
        The noise scale of ``mu`` and ``mu-sandwich``: ``row`` (each output row's mean squared
        output) or ``layer`` (one for the layer); see :mod:`mustat.layerwise.solve`.
    block_size
        Columns per lazy block of the update (SparseGPT's 128); a multiple of M for N:M.
    layers
        Names of the tensors to prune (``model.named_parameters()`` names); default every
        supported one except ``exclude`` and tensors tied to an embedding.
    exclude
        Module names (full path or last component) left out by default: the language-model head.
    forward
        ``forward(model, batch)`` for models called another way.
    progress
        Show a progress bar over the groups of layers.

    Returns
    -------
    OneShotReport
    """
    method = check_option(method, "method", S.METHODS)
    nm = parse_pattern(pattern)
    if scope is None:
        scope = "layer" if method == "sparsegpt" and not nm.structured else "row"
    scope = check_option(scope, "scope", S.SCOPES)
    if sparsity is not None:
        check_scalar(sparsity, "sparsity", kind=Real, low=0.0, high=1.0, closed="left")
    sparsity = resolve_sparsity(sparsity, nm)
    if nm.structured and scope != "row":
        raise ValueError(f"scope={scope!r} does not apply to pattern='{nm}': every group of {nm.m} keeps {nm.n}; "
                         "use scope='row'")
    check_scalar(damping, "damping", kind=Real, low=0.0, high=1e6, closed="right")
    if damping == 0:
        raise ValueError("damping must be in (0, 1e6], got 0: the Gram matrix of collinear inputs is singular")
    sigma = check_option(sigma, "sigma", ("row", "layer"))
    check_scalar(block_size, "block_size", kind=Integral, low=1)
    block_size = int(block_size)
    if update is not None and not isinstance(update, bool):
        raise TypeError(f"update must be True, False or None, got {update!r}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be a function forward(model, batch), got {type(forward).__name__}")
    if isinstance(layers, str):
        raise TypeError(f"layers must be a list of parameter names, got the string {layers!r}")
    if nm.structured and block_size % nm.m:
        raise ValueError(f"block_size={block_size} must be a multiple of M={nm.m} for pattern='{nm}'")
    if update is None:
        update = method == "sparsegpt"
    needs_data = method != "magnitude" or update
    if calibration is None and needs_data:
        raise ValueError(f"calibration batches are required for method={method!r}"
                         f"{' with update' if update else ''}; only magnitude without update needs none")
    if isinstance(exclude, str):
        exclude = (exclude,)
    if calibration is not None:
        if isinstance(calibration, (Tensor, Mapping)):
            raise TypeError("calibration must be an iterable of batches (a list or a DataLoader), not one "
                            f"{type(calibration).__name__}; wrap a single batch in a list")
        if iter(calibration) is calibration:
            calibration = list(calibration)
        first = next(iter(calibration), None)
        if first is None:
            raise ValueError("calibration is empty; give at least one batch")
        if not isinstance(first, (Tensor, Mapping, tuple, list)) and forward is None:
            raise TypeError(f"a calibration batch must be a tensor, a tuple/list (inputs first) or a dict of "
                            f"inputs, got {type(first).__name__}; or pass forward=...")
    table = entries(model)
    targets, skipped = find_targets(model, table, None if layers is None else list(layers), tuple(exclude))
    if not targets:
        raise ValueError("the model has no layer one-shot pruning supports (nn.Linear, transformers' Conv1D, "
                         "nn.MultiheadAttention)")
    for t in targets:
        for rows, _ in t.parts:
            check_groups(t.matrix()[rows].shape, nm, t.name)
    device = next(model.parameters()).device
    start = time.perf_counter()
    rows_out, passes = [], 0
    with _inference(model):
        if needs_data:
            order, once, unreached, inputs = _trace(model, first, forward, targets, device)
            passes += 1
            skipped += [(t.name, "not reached by the calibration forward") for t in targets if t.name in unreached]
            groups = _groups(order, inputs, once)
        else:
            groups = [[t] for t in targets]
        if not groups:
            raise ValueError("no layer was reached by the calibration forward; check forward= and the batches")
        shares = {t.name: sparsity for g in groups for t in g}
        if scope == "global":
            shares = _global_shares(model, calibration, forward, groups, method, sparsity, damping, sigma, device)
            passes += int(method != "magnitude")
            scope = "layer"
        flat = [t for g in groups for t in g]
        bar = tqdm(total=len(flat), desc=f"one-shot {method}", disable=not progress, unit="layer")
        for gi, group in enumerate(groups):
            grams = None
            tic = time.perf_counter()
            if needs_data:
                run = _Pass(group, method == "mu-sandwich", device)
                run.run(model, calibration, forward, groups[gi + 1][0] if once and gi + 1 < len(groups) else None)
                passes += 1
                grams = run.grams
            share = time.perf_counter() - tic
            for t in group:
                tic = time.perf_counter()
                W, alive = _matrix(t)
                W_new, keep = torch.empty_like(W), torch.empty_like(alive)
                error_num = error_den = 0.0
                for i, (rows, _) in enumerate(t.parts):
                    g = grams.get((t.name, i)) if grams is not None else None
                    W_new[rows], keep[rows] = S.solve(W[rows], g, method=method, sparsity=shares[t.name], scope=scope,
                                                      pattern=nm, update=update, damping=damping,
                                                      block_size=block_size, alive=alive[rows], sigma=sigma)
                    if g is not None:
                        D = W_new[rows] - W[rows]
                        error_num += float(torch.einsum("ij,jk,ik->", D, g.H, D))
                        error_den += float(torch.einsum("ij,jk,ik->", W[rows], g.H, W[rows]))
                dest = t.entry.leaf if t.entry.leaf is not None else getattr(t.module, t.attr)
                with torch.no_grad():
                    dest.copy_(t.to_stored(W_new).to(dest.dtype))
                install_mask(model, t.name, t.to_stored(keep), table)
                rows_out.append(dict(name=t.name, kind=t.kind, rows=W.shape[0], inputs=W.shape[1],
                                     sparsity=float(1 - keep.float().mean()),
                                     error=error_num / error_den if error_den > 0 else float("nan"),
                                     seconds=time.perf_counter() - tic + share / len(group)))
                bar.update()
        bar.close()
    return OneShotReport(pd.DataFrame(rows_out), PruningReport.from_model(model, [t.name for t in flat]),
                         skipped, passes, time.perf_counter() - start)


def _global_shares(model, calibration, forward, groups, method, sparsity, damping, sigma, device) -> dict[str, float]:
    """Each layer's sparsity when the method's scores of the dense model compete across layers."""
    flat = [t for g in groups for t in g]
    grams = {}
    if method != "magnitude":
        run = _Pass(flat, method == "mu-sandwich", device)
        run.run(model, calibration, forward, None)
        grams = run.grams
    parts, sizes, alive_all = [], [], []
    for t in flat:
        W, alive = _matrix(t)
        s = torch.cat([S.scores(method, W[rows] * alive[rows], grams.get((t.name, i)), damping, sigma).flatten()
                       for i, (rows, _) in enumerate(t.parts)])
        a = torch.cat([alive[rows].flatten() for rows, _ in t.parts])
        parts.append(s.masked_fill(~a, float("-inf")).cpu())
        sizes.append(s.numel())
        alive_all.append(a.cpu())
    flat_s = torch.cat(parts)
    k = max(round(sparsity * flat_s.numel()), int((~torch.cat(alive_all)).sum()))
    pruned = torch.zeros(flat_s.numel(), dtype=torch.bool)
    pruned[torch.sort(flat_s, stable=True).indices[:k]] = True
    out, start = {}, 0
    for t, n in zip(flat, sizes):
        out[t.name] = float(pruned[start:start + n].sum()) / n
        start += n
    return out
