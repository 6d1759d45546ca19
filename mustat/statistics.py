"""Input statistics of layers from calibration batches: the one collector that one-shot pruning,
structured pruning and their reports read.

- :class:`Gram`: ``H = sum_t x_t x_t^T`` over a layer's input tokens (float32 products, float64
  sums), or only its diagonal (Wanda's statistic: d numbers, not d^2), optionally with the
  sandwich's token-weighted meat.
- :class:`Damping`: what is added to ``H``'s diagonal, with its unit explicit: ``relative`` (a
  fraction of the mean diagonal: SparseGPT's ``percdamp``, unit-free) or ``absolute`` (added as
  is, in the units of ``H``).
- :class:`Collector`: forward hooks that feed the Grams of some layers (:class:`mustat.layers.Target`:
  a Linear, a transformers ``Conv1D``, a convolution's unfolded patches, attention's q/k/v slices
  and its recomputed values) over calls of a model or of one block, padding tokens left out; it
  can end each call as soon as every layer has its input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from numbers import Real

import torch
from torch import Tensor, nn

from mustat._checks import check_option, check_scalar
from mustat._functional import eval_mode
from mustat._params import entries
from mustat.layers import Target, find_targets, mha_inputs, mha_values

DAMPING_UNITS = ("relative", "absolute")


@dataclass(frozen=True)
class Damping:
    """A ridge added to a Gram or curvature matrix's diagonal, with its unit named.

    ``unit="relative"``: ``value * mean(diag H)`` (SparseGPT's ``percdamp=0.01``), invariant to the
    scale of the inputs and to how many tokens were summed. ``unit="absolute"``: ``value`` itself,
    in the units of ``H``.
    """

    value: float
    unit: str = "relative"

    def __post_init__(self):
        check_scalar(self.value, "damping", kind=Real, low=0.0)
        check_option(self.unit, "unit", DAMPING_UNITS)

    @classmethod
    def of(cls, damping: float | Damping, unit: str = "relative") -> Damping:
        """``damping`` as a :class:`Damping` (a number takes ``unit``)."""
        return damping if isinstance(damping, Damping) else cls(damping, unit)

    def amount(self, H: Tensor) -> float:
        """The ridge for ``H`` (a matrix, or its diagonal as a vector)."""
        if self.unit == "absolute":
            return float(self.value)
        mean = float((H if H.dim() == 1 else H.diagonal()).mean())
        if not mean > 0:
            raise ValueError("the calibration inputs of this layer are all zero (mean of diag H is 0): nothing "
                             "tells which weights matter; check the calibration batches reach it")
        return self.value * mean

    def add_to(self, H: Tensor) -> Tensor:
        """``H`` with the ridge on its diagonal (a new tensor)."""
        return H + self.amount(H) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def damped(H: Tensor, damping: float | Damping) -> Tensor:
    """``H`` plus the ridge: ``damping * mean(diag H) * I`` for a number (relative damping), or per
    the :class:`Damping`'s unit. Refuses a Gram with no information."""
    return Damping.of(damping).add_to(H)


@dataclass
class Gram:
    """Calibration statistics of one input: ``H = sum_t x_t x_t^T`` over ``n`` tokens (float64),
    and for the sandwich ``M_raw = sum_t e_t x_t x_t^T`` with ``e_t = ||W x_t||^2`` and
    ``S = sum_t e_t``. With ``diagonal=True`` only ``diag H`` (``sum_t x_t^2``, Wanda's
    ``scaler_row``) is kept: d numbers instead of d^2, for statistics that read nothing else. With
    ``bias=True`` the tokens carry a constant last coordinate, ``(x_t, 1)``, for a refit that
    includes the bias: ``H`` is ``(d + 1) x (d + 1)``."""

    d: int
    device: torch.device
    sandwich: bool = False
    diagonal: bool = False
    bias: bool = False
    n: int = 0
    H: Tensor = field(init=False)
    M_raw: Tensor | None = field(init=False, default=None)
    S: float = 0.0

    def __post_init__(self):
        if self.diagonal and self.sandwich:
            raise ValueError("the sandwich needs the whole Gram matrix (diagonal=False)")
        if self.bias and (self.diagonal or self.sandwich):
            raise ValueError("the bias coordinate is kept only with the whole Gram matrix (no diagonal, no sandwich)")
        k = self.d + int(self.bias)
        shape = (k,) if self.diagonal else (k, k)
        self.H = torch.zeros(shape, dtype=torch.float64, device=self.device)
        if self.sandwich:
            self.M_raw = torch.zeros_like(self.H)

    def add(self, x: Tensor, xtx: Tensor | None = None, W: Tensor | None = None) -> None:
        """Add tokens ``x`` (tokens x d, or ``(batch, d, positions)``: see :func:`input_statistic`);
        ``xtx`` is their statistic (Gram, or its diagonal) when already computed, ``W`` the rows
        this input feeds (for the sandwich's ``e_t``)."""
        x = x.detach()
        if xtx is None:
            xtx = input_statistic(x, self.diagonal)
        count = x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[2]
        if self.bias:
            d, s = self.d, x.sum(0 if x.dim() == 2 else (0, 2), dtype=torch.float64)
            self.H[:d, :d] += xtx
            self.H[:d, d] += s
            self.H[d, :d] += s
            self.H[d, d] += count
        else:
            self.H += xtx
        self.n += count
        if self.sandwich:
            if x.dim() != 2:
                raise ValueError("the sandwich's token weights need tokens x d inputs")
            x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
            e = (x @ W.detach().to(device=x.device, dtype=x.dtype).T).double().pow(2).sum(1)
            xd = x.double()
            self.M_raw += (xd * e[:, None]).T @ xd
            self.S += float(e.sum())

    @property
    def diag(self) -> Tensor:
        return self.H if self.diagonal else self.H.diagonal()

    def meat(self) -> Tensor:
        """``M`` with the token factors normalised to mean 1."""
        if self.S <= 0:
            return self.H
        return self.M_raw * (self.n / self.S)


def input_statistic(x: Tensor, diagonal: bool = False) -> Tensor:
    """``x^T x`` over tokens, or only its diagonal: float32 products (float64 inputs stay float64),
    summed in float64. ``x`` is tokens x d, or ``(batch, d, positions)`` (features first, as
    :func:`mustat.layers.patches` gives a convolution's patches): its positions are tokens, and the
    products are batched over about 32 MiB of output without copying ``x``."""
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if x.dim() == 2:
        return x.square().sum(0).double() if diagonal else (x.T @ x).double()
    if diagonal:
        return x.square().sum((0, 2), dtype=torch.float64)
    d = x.shape[1]
    if x.shape[2] == 1:
        r = x[:, :, 0]
        return (r.T @ r).double()
    out = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    step = max(1, (32 << 20) // (x.element_size() * d * d))
    for j in range(0, len(x), step):
        b = x[j:j + step]
        out += torch.bmm(b, b.transpose(1, 2)).sum(0, dtype=torch.float64)
    return out


def token_mask(batch) -> Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None


def tokens(x: Tensor, mask: Tensor | None, seq_first: bool = False) -> Tensor:
    """``x`` as (tokens, features), padding tokens dropped where a mask matches its layout."""
    if mask is not None and x.dim() == 3:
        m = mask.T if seq_first else mask
        if tuple(x.shape[:2]) == tuple(m.shape):
            return x[m]
    return x.reshape(-1, x.shape[-1])


class Stop(Exception):
    """Raised by a hook to end a forward pass once the layers being measured have their inputs."""


def layer_input(t: Target, args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else next(iter(kwargs.values()))


@dataclass
class Call:
    """One call over the calibration batches: ``run()`` calls the model (or a block), ``mask``
    marks the batch's real tokens."""

    run: Callable[[], object]
    mask: Tensor | None


class Collector:
    """Hooks that feed the Gram matrices (or their diagonals) of some targets; with ``halt``, each
    call is ended as soon as every target has its input."""

    def __init__(self, targets: list[Target], sandwich: bool, device: torch.device, diagonal: bool = False,
                 bias: bool = False):
        self.targets, self.sandwich, self.device, self.bias = targets, sandwich, device, bias
        self.diagonal = {t.name: diagonal and t.kind in ("linear", "conv1d", "conv") for t in targets}
        self.grams: dict[tuple[str, int], Gram] = {}
        self.mask: Tensor | None = None
        self.cache: tuple | None = None   # (input, diagonal, tokens, statistic, the key that computed it)
        self.checked: set[int] = set()
        self.fed: set[str] = set()
        self.shared: set[tuple[str, int]] = set()   # keys whose Gram is another's (the same input)

    @torch.no_grad()      # in a pass that differentiates (output_fisher's), no graph for the statistics
    def _add(self, t: Target, part: int, rows: slice, x: Tensor, seq_first: bool = False) -> None:
        diagonal = self.diagonal[t.name]
        key = (t.name, part)
        if key in self.shared:
            return
        # layers share an input only when called one after another: keep the last input's statistic only
        hit = not (self.cache is None or self.cache[0] is not x or self.cache[1] != diagonal or t.kind == "conv")
        if not hit:
            tok = t.tokens(x) if t.kind == "conv" else tokens(x, self.mask, seq_first)
            xtx = input_statistic(tok, diagonal)
            if not bool(torch.isfinite(xtx if diagonal else xtx.diagonal()).all()):   # NaN or inf reach diag
                raise ValueError(f"the calibration inputs of {t.name!r} contain NaN or inf; check the model and "
                                 "the batches (a float16 overflow?)")
            self.cache = (x, diagonal, tok, xtx, key)
        _, _, tok, xtx, first = self.cache
        if key not in self.grams:
            if hit and not self.sandwich:   # the same statistic: one Gram serves every layer reading this input
                self.grams[key] = self.grams[first]
                self.shared.add(key)
                return
            self.grams[key] = Gram(tok.shape[1], xtx.device, sandwich=self.sandwich, diagonal=diagonal,
                                   bias=self.bias)
        W = t.matrix()[rows] if self.sandwich else None
        self.grams[key].add(tok, xtx, W)

    def hooks(self, halt: bool) -> list:
        names = {t.name for t in self.targets}

        def done(t: Target) -> None:
            self.fed.add(t.name)
            if halt and self.fed >= names:
                raise Stop

        handles = []
        for t in self.targets:
            if t.kind in ("linear", "conv1d", "conv"):
                def pre(module, args, kwargs, t=t):
                    self._add(t, 0, slice(None), layer_input(t, args, kwargs))
                    done(t)
                handles.append(t.caller.register_forward_pre_hook(pre, with_kwargs=True))
            elif t.kind == "mha-in":
                def pre(module, args, kwargs, t=t):
                    call = mha_inputs(module, args, kwargs)
                    seq_first = not module.batch_first
                    for i, (rows, source) in enumerate(t.parts):
                        self._add(t, i, rows, call[source], seq_first)
                    done(t)
                handles.append(t.caller.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(module, args, kwargs, output, t=t):
                    values = mha_values(module, mha_inputs(module, args, kwargs))
                    if id(module) not in self.checked:
                        self._check(module, values, output[0])
                    self._add(t, 0, slice(None), values, not module.batch_first)
                    done(t)
                handles.append(t.caller.register_forward_hook(post, with_kwargs=True))
        return handles

    def _check(self, mha: nn.Module, values: Tensor, output: Tensor) -> None:
        again = mha.out_proj(values)
        if not torch.allclose(again, output, rtol=1e-3, atol=1e-5 * float(output.abs().max()) + 1e-12):
            raise RuntimeError(f"could not recompute the input of {type(mha).__name__}.out_proj from its call "
                               "(a customised attention module?); leave its out_proj out of layers")
        self.checked.add(id(mha))

    def begin(self, mask: Tensor | None) -> None:
        """A new batch: its token mask, and no input or target carried over from the last one."""
        self.mask, self.cache, self.fed = mask, None, set()

    def run(self, calls: Iterable[Call], halt: bool) -> None:
        handles = self.hooks(halt)
        try:
            for c in calls:
                self.begin(c.mask)
                try:
                    c.run()
                except Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
            self.cache = None


def to_device(batch, device):
    """A batch (a tensor, a dict, a tuple or list of them) moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def call_model(model: nn.Module, batch, forward: Callable | None = None):
    """``forward(model, batch)``, or the model called on the batch: ``model(**batch)`` for a dict (no
    key/value cache: it would grow when blocks are replayed), ``model(batch[0])`` for a DataLoader's
    ``(inputs, labels)``, ``model(batch)`` for a tensor."""
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, Mapping):
        if getattr(getattr(model, "config", None), "use_cache", False) and "use_cache" not in batch:
            return model(**batch, use_cache=False)
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


@torch.no_grad()
def layer_grams(model: nn.Module, batches: Iterable, layers: Mapping[str, nn.Module], *, bias: bool = False,
                diagonal: bool = False, forward: Callable | None = None) -> dict[str, Gram]:
    """The :class:`Gram` of the input of each of ``layers`` (``{key: module}``, modules of ``model``
    that :func:`mustat.layers.find_targets` supports) over the real tokens of ``batches`` (one
    pass; dicts' ``attention_mask == 0`` tokens left out), keyed like ``layers``. The model is run
    in eval mode, and its modes are put back."""
    table = entries(model)
    by_place = {(id(s.module), s.attr): e.name for e in table.values() for s in e.places()}
    names = {}
    for key, module in layers.items():
        name = by_place.get((id(module), "weight"))
        if name is None:
            raise ValueError(f"layers[{key!r}] is not a module of the model with a weight")
        names[name] = key
    targets, _ = find_targets(model, table, list(names), ())
    device = next(model.parameters()).device
    collector = Collector(targets, False, device, diagonal=diagonal, bias=bias)
    with eval_mode(model):
        collector.run([Call(lambda b=b: call_model(model, to_device(b, device), forward), token_mask(b))
                       for b in batches], halt=False)
    out = {names[t.name]: collector.grams[(t.name, 0)] for t in targets if (t.name, 0) in collector.grams}
    missing = sorted(set(layers) - set(out))
    if missing:
        raise ValueError(f"no calibration input reached {missing} (empty batches?)")
    return out


def causal_lm_loss(model: nn.Module, batch: Mapping) -> Tensor:
    """The next-token cross-entropy of a ``transformers`` causal LM on a dict batch (its
    ``input_ids`` as labels; tokens where ``attention_mask`` is 0 left out): the ``loss`` that
    :func:`output_fisher` takes for such a model."""
    labels = batch["input_ids"]
    mask = batch.get("attention_mask")
    if isinstance(mask, Tensor):
        labels = labels.masked_fill(mask == 0, -100)
    return call_model(model, {**batch, "labels": labels}).loss


def output_fisher(model: nn.Module, batches: Iterable, targets: list[Target],
                  loss: Callable[[nn.Module, object], Tensor], collector: Collector | None = None
                  ) -> dict[str, Tensor]:
    r"""The diagonal of K-FAC's output factor of the model's own loss for each target:
    :math:`B_{ii} = \sum_t (\partial L / \partial y_{ti})^2` over the calibration tokens ``t`` (a
    convolution's output positions), ``L = loss(model, batch)`` per batch (the empirical Fisher:
    the data's own labels). With the input Gram ``H`` it gives the Kronecker-factored Fisher
    :math:`B \otimes H` of the loss, whose diagonal-``B`` Wald statistic of ``w_ij = 0`` is
    :math:`B_{ii} w_{ij}^2 / [H^{-1}]_{jj}` (LLM Surgeon's setting, cross-row terms dropped).

    Parameters' ``.grad`` are left as they were: the gradients are taken with respect to a zero
    added to the layers' outputs, one layer's output gradient held at a time, with the parameters'
    ``requires_grad`` off for the pass (autograd then keeps no layer inputs for weight gradients;
    a module called several times in a forward counts every call). The model runs in eval mode;
    its modes and ``requires_grad`` flags are put back. Memory grows with the tokens of one batch.
    Only layers called as modules (Linear, transformers' Conv1D, convolutions) are supported.

    ``collector``: a :class:`Collector` whose hooks run in the same forward passes (never halting),
    so the input Grams of the model the factor is measured on come with it, without a pass of
    their own: the Kronecker factors ``B`` and ``H`` of the same forward, the inputs as ``loss``
    runs the model.
    """
    unsupported = [t.name for t in targets if t.kind not in ("linear", "conv1d", "conv")]
    if unsupported:
        raise ValueError(f"the loss's output factor needs layers called as modules; {unsupported} are parts of an "
                         "attention module (nn.MultiheadAttention): leave them out (layers=[...])")
    device = next(model.parameters()).device
    sums: dict[str, Tensor] = {}
    # one zero scalar per dtype and device, added to every target's output: the backward pass towards it
    # runs through every output, whose gradient a hook squares and sums as it passes and then drops, so
    # one layer's output gradient is held at a time (returning all of them at once held every layer's
    # output gradient of the batch together: 11.4 GB peak for SmolLM2-135M on 8 x 256 tokens)
    zeros: dict[tuple, Tensor] = {}

    def take(grad: Tensor, t: Target) -> None:
        g = grad.detach().double().square()
        axis = g.dim() - t.module.weight.dim() + 1 if t.kind == "conv" else g.dim() - 1
        row = g.sum(tuple(d for d in range(g.dim()) if d != axis))
        sums[t.name] = row if t.name not in sums else sums[t.name] + row

    def hook(module, args, out, t):
        key = (out.dtype, out.device)
        if key not in zeros:
            zeros[key] = torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
        y = out + zeros[key]
        y.register_hook(lambda grad, t=t: take(grad, t))
        return y

    # the parameters need no gradient here: with requires_grad off for the pass, autograd saves only what
    # the outputs' gradients need, not every layer's input for a weight gradient (put back afterwards)
    trainable = [p for p in model.parameters() if p.requires_grad]
    handles = []
    try:
        handles += [t.module.register_forward_hook(lambda m, a, o, t=t: hook(m, a, o, t)) for t in targets]
        if collector is not None:
            handles += collector.hooks(halt=False)
        for p in trainable:
            p.requires_grad_(False)
        with eval_mode(model), torch.enable_grad():
            for batch in batches:
                zeros.clear()
                if collector is not None:
                    collector.begin(token_mask(batch))
                value = loss(model, to_device(batch, device))
                if zeros and value.requires_grad:
                    torch.autograd.backward(value, inputs=list(zeros.values()))
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
        if collector is not None:
            collector.cache = None
    missing = [t.name for t in targets if t.name not in sums]
    if missing:
        raise ValueError(f"the loss does not depend on {missing} (not reached, or after the loss is computed)")
    return sums
