r"""The ``curvature`` estimator: per-weight standard errors ``1 / sqrt(diag)`` of
the summed generalized Gauss-Newton matrix plus the training's L2 penalty.

Statistics. For a loss :math:`\ell(f(x;\theta), y)` the Gauss-Newton matrix is
:math:`G = \sum_i J_i^\top \Lambda_i J_i`, with :math:`J_i` the Jacobian of the
network output and :math:`\Lambda_i = \nabla_f^2 \ell_i` the loss's Hessian in
output space. For softmax cross-entropy and the Bernoulli likelihood
:math:`\Lambda_i` does not depend on the label, so :math:`G` is the model's
*expected* Fisher information (not the empirical one,
:math:`\sum_i g_i g_i^\top`). With weight decay :math:`\lambda` on the mean loss
the penalised curvature adds :math:`n\lambda`, and

.. math:: \widehat{se}_j = 1 / \sqrt{G_{jj} + n\lambda}.

This is the per-weight curvature SE behind Optimal Brain Damage (LeCun et al.
1990; the M&U score :math:`|w|/se` then ranks by :math:`w^2 G_{jj}`, OBD's
saliency up to the factor 1/2) and a diagonal Laplace approximation. It
conditions on all other weights, so with correlated features it is low by
:math:`1/\sqrt{\mathrm{VIF}_j}` against the full Wald SE: the per-weight
baseline trajectory estimators must beat.

Computation: :math:`\Lambda_i = L_i L_i^\top` (eigendecomposition, negative
eigenvalues of non-convex losses clipped at 0), and
:math:`G_{jj} = \sum_i \sum_c (J_i^\top L_{i,c})_j^2`, exact, in chunks of
samples. For an ``nn.Linear`` layer applied once to a batch of vectors the
per-sample gradient is the outer product :math:`b_{i,c} a_i^\top` of the
back-propagated vector and the layer's input, so its diagonal is
:math:`\sum_i (\sum_c b_{i,c}^2)(a_i^2)^\top`: C backward passes of the whole
chunk instead of C per-sample gradients of every weight (BackPACK's DiagGGN
rule; 321x faster on LeNet-300-100, ``benchmarks/curvature_ggn.py``). Every
other parameter takes per-sample vector-Jacobian products by ``torch.func.vmap``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from numbers import Integral
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from mustat._checks import check_option, check_scalar
from mustat._functional import FunctionalModel, eval_mode, hessian, vmap_or_loop
from mustat.batching import Data, batches
from mustat.uncertainty.base import (
    CurvatureEstimator,
    DegenerateSEWarning,
    FitContext,
    Loss,
    register_estimator,
)


def output_factor(loss: Loss, out_shape: torch.Size | tuple[int, ...]) -> Callable[[Tensor, Tensor], Tensor]:
    r"""A function ``(outputs, targets) -> L`` of shape ``(m, C, C)`` with
    :math:`\Lambda_i = L_i L_i^\top`, the per-sample Hessian of ``loss`` in output space.

    Softmax cross-entropy and the Bernoulli logit loss have closed forms, which are used when the
    loss is recognised (its output Hessian on the first call equals the closed form to 1e-5):
    :math:`\Lambda = \mathrm{diag}(p) - pp^\top = L L^\top` with
    :math:`L = \mathrm{diag}(\sqrt p) - p\sqrt p^\top` (exact because the probabilities sum to 1),
    and :math:`\sigma(1-\sigma)` for one logit. Any other loss takes autograd's output Hessian and
    a per-sample eigendecomposition (negative eigenvalues of non-convex losses clipped at 0). The
    closed form is exact in any dtype; the eigendecomposition of a float32 autograd Hessian is not
    (single entries of a GGN diagonal off by up to 3e-4 relative on LeNet-5). The loss must be
    the same function of every sample's output: with ``ignore_index`` or per-sample weights the
    first samples decide, so pass a loss without them.

    Log-probabilities (PyTorch's MNIST example: the model ends in ``log_softmax``, the loss is
    ``nll_loss``). ``nll_loss`` is linear in its input, :math:`\ell(u, y) = -u_y`, so its output
    Hessian is 0 and a Gauss-Newton matrix split at the log-probabilities :math:`u` would be 0
    (every SE :math:`1/\sqrt{n\lambda}`). The split is moved into the log-softmax instead. On
    log-probabilities :math:`\mathrm{logsumexp}(u) = 0`, so :math:`s(u) = u - \mathrm{logsumexp}(u)
    \mathbf 1` (log-softmax) returns :math:`u` and ``nll_loss(u) = cross_entropy(u)``: the loss
    is cross-entropy at the outputs, and cross-entropy's output Hessian there is
    :math:`\Lambda = \mathrm{diag}(p) - pp^\top` with :math:`p = \exp u`. The GGN with this
    :math:`\Lambda` at :math:`u` is the GGN of the network's logits :math:`a` (the log-softmax's
    input) under cross-entropy: with :math:`u = s(a)` the Jacobians are
    :math:`J_u = (I - \mathbf 1 p^\top) J_a`, and since :math:`\Lambda \mathbf 1 = 0` and
    :math:`\mathbf 1^\top \Lambda = 0`,

    .. math:: (I - p\mathbf 1^\top)(\mathrm{diag}(p) - pp^\top)(I - \mathbf 1 p^\top)
              = \mathrm{diag}(p) - pp^\top,

    so :math:`J_u^\top \Lambda J_u = J_a^\top \Lambda J_a` (``tests/test_curvature.py`` checks it
    against a dense GGN of the logits). The pattern is recognised on the
    first call when the outputs are one vector per sample, every probed row has
    :math:`|\mathrm{logsumexp}(u)| \le 10^3\epsilon` (:math:`\epsilon` the dtype's machine
    epsilon) and the loss of each probed sample equals ``F.cross_entropy`` there to the same
    tolerance; the closed form above is then used.

    Any other loss whose output Hessian is identically 0 on the whole first chunk (``nll_loss``
    on outputs that are not log-probabilities, a loss linear or piecewise linear in the outputs)
    has no Gauss-Newton curvature: a :class:`~mustat.uncertainty.DegenerateSEWarning` says so
    and the (zero) factor is returned, so the SEs are :math:`1/\sqrt{n\lambda}` (``inf`` without
    a penalty) where those samples are all there is.
    """
    shape = tuple(out_shape)
    C = max(1, int(torch.Size(shape).numel()))

    def sample_loss(o, t):
        return loss(o.reshape(1, *shape), t[None])

    def autograd(outs, yb):
        lam = vmap(hessian(sample_loss))(outs, yb).reshape(len(outs), C, C)
        return 0.5 * (lam + lam.transpose(1, 2))

    def softmax(outs):
        p = outs.softmax(-1)
        return p.diag_embed() - p.unsqueeze(2) * p.unsqueeze(1), p

    def sigmoid(outs):
        s = outs.sigmoid()
        return (s * (1 - s)).unsqueeze(-1)

    def log_probabilities(outs, yb) -> bool:
        """Whether ``outs`` are log-probabilities at which ``loss`` is cross-entropy (notes)."""
        if len(shape) != 1 or C < 2 or not outs.is_floating_point():
            return False
        tol = 1e3 * torch.finfo(outs.dtype).eps
        with torch.no_grad():
            if not bool((outs.logsumexp(-1).abs() <= tol).all()):
                return False
            try:
                mine = torch.stack([sample_loss(o, t) for o, t in zip(outs, yb)])
                ce = torch.stack([F.cross_entropy(o[None], t[None]) for o, t in zip(outs, yb)])
            except (RuntimeError, ValueError, TypeError, IndexError):   # targets cross_entropy cannot take
                return False
        return mine.shape == ce.shape and torch.allclose(mine.to(ce.dtype), ce, rtol=tol, atol=tol)

    chosen: list[str] = []

    def factor(outs: Tensor, yb: Tensor) -> Tensor:
        outs = outs.reshape(len(outs), C)
        first = not chosen
        if first:
            probe = autograd(outs[:4], yb[:4])
            closed = softmax(outs[:4])[0] if C > 1 else sigmoid(outs[:4])
            scale = probe.abs().amax().clamp_min(1e-30)
            if torch.allclose(probe, closed, rtol=1e-5, atol=1e-5 * float(scale)):
                chosen.append("closed")
            elif log_probabilities(outs[:4], yb[:4]):
                chosen.append("closed")                 # the same closed form, through the log-softmax
            else:
                chosen.append("eigen")
        if chosen[0] == "closed":
            if C == 1:
                return sigmoid(outs).sqrt()
            _, p = softmax(outs)
            r = p.sqrt()
            return r.diag_embed() - p.unsqueeze(2) * r.unsqueeze(1)
        lam = autograd(outs, yb)
        if first and not bool(lam.any()):
            warnings.warn(DegenerateSEWarning(
                f"the loss's Hessian in output space is identically 0 on all {len(outs)} samples of the first "
                "chunk, so the Gauss-Newton curvature is 0 there and the SEs degenerate to 1/sqrt(n*weight_decay) "
                "(inf without decay): mu then ranks by magnitude alone. nll_loss needs log-probabilities: end the "
                "model in log_softmax, or pass cross_entropy on its logits; a loss linear in the outputs has no "
                "Gauss-Newton curvature (use an estimator of gradients: block, woodfisher, pseudo)",
                estimator="output_factor", diagnostics=dict(samples=len(outs), outputs=C)), stacklevel=3)
        evals, evecs = torch.linalg.eigh(lam)
        return evecs * evals.clamp_min(0).sqrt().unsqueeze(1)

    return factor


def ggn_diagonal(model: nn.Module, loss: Loss, data: Data, *, names: Iterable[str],
                 chunk_elements: int = 1 << 24, method: str = "auto") -> dict[str, Tensor]:
    """Diagonal of the summed Gauss-Newton matrix ``sum_i J_i^T Lambda_i J_i`` (module notes).

    ``loss(output, target)`` is the mean loss of a batch; ``data`` is ``(X, y)`` tensors or an
    iterable of batches (a DataLoader), read one batch at a time; ``names`` the tensors
    (masked weights count as their effective tensor, a tied one once with both its uses).
    The model is not modified: it is differentiated through the functional view in eval
    mode and its dtype. ``chunk_elements`` bounds the per-sample gradients held at once.
    ``method``: ``"auto"`` (the outer-product rule for linear layers, per-sample products
    for the rest) or ``"vmap"`` (per-sample products for every parameter; the same
    numbers, slower: a reference).
    """
    method = check_option(method, "method", ("auto", "vmap"))
    fm = FunctionalModel(model)
    names = [fm.name(n) for n in names]
    params = fm.params(names)
    with eval_mode(model):
        first = next(batches(data), None)
        if first is None:
            raise ValueError("ggn_diagonal: the data has no batches")
        probe = first[0][:2]
        linear = _linear_layers(model, fm, names, probe) if method == "auto" else {}
        by_rule = {n for mod in linear for n in linear[mod]}
        wanted = {n: params[n] for n in names if n not in by_rule}

        def output(p, x):
            return fm(p, x[None])[0]

        with torch.no_grad():
            out_shape = output(wanted, probe[0]).shape
        C = max(1, int(torch.Size(out_shape).numel()))

        factor_of = output_factor(loss, out_shape)
        def vjp_sq(p, x, v):
            return (output(p, x).reshape(-1) * v).sum()

        per_vec = vmap_or_loop(grad(vjp_sq), in_dims=(None, None, 0))  # over the C factor columns
        per_sample = vmap_or_loop(per_vec, in_dims=(None, 0, 0))       # over samples
        P = sum(t.numel() for t in wanted.values())
        widths = sum(mod.in_features + mod.out_features for mod in linear)
        chunk = max(1, chunk_elements // (C * max(P, widths, 1)))
        diag = {n: torch.zeros_like(params[n]) for n in names}
        for X, y in batches(data):
            for start in range(0, len(y), chunk):
                xb, yb = X[start : start + chunk], y[start : start + chunk]
                with torch.no_grad():
                    outs = fm({}, xb).reshape(len(xb), C)
                factor = factor_of(outs, yb)                              # columns L_c: Lambda = sum_c L_c L_c^T
                if wanted:
                    g = per_sample(wanted, xb, factor.transpose(1, 2))    # (m, C, *shape)
                    for n in wanted:
                        diag[n] += g[n].square().sum((0, 1))
                if linear:
                    _linear_rule(fm, linear, params, xb, factor, C, diag)
    return diag


def _linear_layers(model: nn.Module, fm: FunctionalModel, names: list[str], probe: Tensor
                   ) -> dict[nn.Linear, dict[str, str]]:
    """The ``nn.Linear`` modules whose wanted parameters the outer-product rule can take:
    ``{module: {mustat name: "weight" | "bias"}}``. A layer qualifies when one forward
    pass applies it exactly once, to a 2-D input (a batch of vectors), and its tensors are
    used nowhere else; shared, tied or sequence-applied layers stay with the per-sample products."""
    calls: dict[nn.Module, list[int]] = {}
    handles = [m.register_forward_hook(lambda mod, inp, out: calls.setdefault(mod, []).append(inp[0].dim()))
               for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            fm({}, probe)
    finally:
        for h in handles:
            h.remove()
    layers: dict[nn.Linear, dict[str, str]] = {}
    for n in names:
        e = fm.table[n]
        if len(e.slots) == 1 and e.module in calls and calls[e.module] == [2] and e.attr in ("weight", "bias"):
            layers.setdefault(e.module, {})[n] = e.attr
    return layers


def _linear_rule(fm: FunctionalModel, linear: dict[nn.Linear, dict[str, str]], params: dict[str, Tensor], xb: Tensor,
                 factor: Tensor, C: int, diag: dict[str, Tensor]) -> None:
    """Add one chunk's diagonal for the layers of :func:`_linear_layers` to ``diag``."""
    inputs, outputs = {}, {}

    def keep(mod, inp, out):
        inputs[mod], outputs[mod] = inp[0].detach(), out

    handles = [m.register_forward_hook(keep) for m in linear]
    try:
        with torch.enable_grad():
            # a graph through every layer (the inputs may be token ids, so the tensors carry it)
            leaves = {n: v.detach().requires_grad_() for n, v in params.items()}
            out = fm(leaves, xb).reshape(len(xb), C)
    finally:
        for h in handles:
            h.remove()
    mods = list(linear)
    back = {m: torch.zeros_like(outputs[m]) for m in mods}  # sum_c b_{i,c}^2, per sample and output unit
    for c in range(C):
        # samples are independent in eval mode, so row i of each gradient is sample i's own b_{i,c}
        gs = torch.autograd.grad((out * factor[:, :, c]).sum(), [outputs[m] for m in mods], retain_graph=c < C - 1,
                                 allow_unused=True)
        for m, g in zip(mods, gs):
            if g is not None:
                back[m] += g.square()
    for m, leaves in linear.items():
        for n, leaf in leaves.items():
            diag[n] += back[m].T @ inputs[m].square() if leaf == "weight" else back[m].sum(0)


@register_estimator("curvature")
class Curvature(CurvatureEstimator):
    """``1 / sqrt(diag(GGN) + n * weight_decay)`` after training (module notes).

    ``fit`` needs ``FitContext(X=..., y=..., loss=...)`` (or ``data=``); the penalty comes
    from the context (or its optimizer). A weight with zero curvature and no penalty
    does not enter the likelihood: ``se = inf`` (unidentified, z = 0). Frozen tensors
    have a curvature too, so they can be measured.
    """

    needs = ("data", "loss")
    default = True
    measures_frozen = True
    quantity = "saliency"

    def __init__(self, model: nn.Module, *, params: Iterable[str] | None = None, chunk_elements: int = 1 << 24):
        super().__init__(model, params=params)
        self.chunk_elements = int(check_scalar(chunk_elements, "chunk_elements", kind=Integral, low=1))
        self._penalty = 0.0

    def fit(self, context: FitContext) -> Curvature:
        context.need(self.name, *self.needs)
        self._penalty = context.penalty()
        diag = ggn_diagonal(self._model, context.loss, context.source, names=self.names,
                            chunk_elements=self.chunk_elements)
        prior = context.n * self._penalty
        self._se = {n: torch.where(d + prior > 0, (d + prior).rsqrt(), torch.full_like(d, float("inf")))
                    for n, d in diag.items()}
        self._estimate = self._current_weights()
        return self

    def diagnostics(self) -> dict[str, Any]:
        return dict(weight_decay=self._penalty)
