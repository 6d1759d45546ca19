r"""The ``kfac`` estimator: marginal standard errors from a Kronecker-factored curvature per layer
(K-FAC; Martens & Grosse 2015, for convolutions Grosse & Martens 2016), with the exact diagonal
of its damped inverse (:mod:`mustat.uncertainty.marginal`).

For a layer :math:`s = W \tilde a` (``nn.Linear``; ``nn.Conv1d``/``Conv2d`` on unfolded patches,
with :math:`T` output positions) whose bias is appended to :math:`W` as a last column
(:math:`\tilde a = (a, 1)`), the summed GGN block is approximated by

.. math:: G_W \approx B \otimes A, \quad B = \sum_{i,t,c} b_{itc} b_{itc}^\top, \quad
          A = \frac{1}{nT} \sum_{i,t} \tilde a_{it} \tilde a_{it}^\top,

with :math:`b_{itc}` the output-space factor columns :math:`L_{ic}` (:math:`\Lambda_i = L_i L_i^\top`,
exact: no Monte Carlo labels) back-propagated to the layer's output: curvlinops' ``KFAC`` with
``fisher_type="type-2"`` and ``kfac_approx="expand"`` (``tests/test_kfac.py`` compares the
factors). Both factors are eigendecomposed in float64, :math:`A = Q_A \mathrm{diag}(\alpha) Q_A^\top`,
:math:`B = Q_B \mathrm{diag}(\beta) Q_B^\top`, and the diagonal of
:math:`(B \otimes A + d I)^{-1}` with :math:`d = n(\lambda + \delta)` is exact:

.. math:: [(B\otimes A + dI)^{-1}]_{(o,j),(o,j)} = \sum_{k,l} \frac{Q_{B,ok}^2\, Q_{A,jl}^2}{\beta_k \alpha_l + d}.

The bias is marginalised over (re-fitted), not held fixed. The approximation is exact for a
linear-Gaussian layer (one output, :math:`\Lambda = 1`); in general it assumes inputs and
output gradients independent. Masks are not part of the factors (pruned entries keep their
place in the Kronecker basis); the compensating update respects them exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mustat._checks import check_option, check_scalar
from mustat._functional import eval_mode
from mustat._params import entries
from mustat.batching import batches
from mustat.uncertainty.base import FitContext, register_estimator
from mustat.uncertainty.curvature import output_factor
from mustat.uncertainty.marginal import Marginal, cast_inputs, kept_solve

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: the compensating update's blocks: each output row (cross-row terms dropped) or the whole layer
OBS_BLOCKS = ("row", "layer")


def _patches(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as ``(m, T, features)`` rows (a Linear layer: ``T = 1``; a
    convolution: its unfolded patches, in the order of ``weight.reshape(out, -1)``)."""
    if isinstance(module, nn.Linear):
        return x.reshape(len(x), -1, x.shape[-1])
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        k, d, p, s = (1, *module.kernel_size), (1, *module.dilation), (0, *module.padding), (1, *module.stride)
    else:
        k, d, p, s = module.kernel_size, module.dilation, module.padding, module.stride
    return F.unfold(x, k, dilation=d, padding=p, stride=s).transpose(1, 2)


@register_estimator("kfac")
class KFAC(Marginal):
    """Kronecker-factored marginal SEs (module notes) for the weights of ``nn.Linear``,
    ``nn.Conv1d`` and ``nn.Conv2d`` layers (``groups=1``, numeric zero padding), each applied
    once per forward pass (a Linear layer may see sequences: its positions are the ``T``).
    Other tensors: an error offering ``block``."""

    cheaper = "curvature"
    #: ``kfac-damped``: damping 1e-4 in weight-decay units, for a model trained without weight decay
    #: (whose curvature is singular: constant inputs, dead units)
    variants = {"kfac-sandwich": {"kind": "sandwich"}, "kfac-layer": {"obs_block": "layer"},
                "kfac-damped": {"damping": 1e-4}}

    def __init__(self, model: nn.Module, *, kind: str = "observed", damping: float = 0.0,
                 params: Iterable[str] | None = None, obs_block: str = "row", cg_tol: float = 1e-10,
                 cg_max_iter: int = 5000, max_memory: int = 4 << 30):
        super().__init__(model, kind=kind, damping=damping, params=params, max_memory=max_memory)
        self.obs_block = check_option(obs_block, "obs_block", OBS_BLOCKS)
        self.cg_tol = float(check_scalar(cg_tol, "cg_tol", kind=Real, low=0.0, high=1.0, closed="neither"))
        self.cg_max_iter = int(check_scalar(cg_max_iter, "cg_max_iter", kind=Integral, low=1))
        self._cg: dict[str, tuple[int, float]] = {}
        self._layers: dict[str, nn.Module] = {}
        for n, e in zip(self.names, self._entries):
            mod = e.module
            if e.tied or e.attr != "weight" or not isinstance(mod, _LAYERS) or getattr(mod, "groups", 1) != 1 \
                    or isinstance(getattr(mod, "padding", 0), str) or getattr(mod, "padding_mode", "zeros") != "zeros":
                raise ValueError(
                    f"estimator {self.name!r} factors the weights of nn.Linear, nn.Conv1d and nn.Conv2d layers (groups=1, "
                    f"numeric zero padding, used once), not {n!r} ({type(mod).__name__}.{e.attr}); use se='block' "
                    "or leave it out of params=")
            self._layers[n] = mod
        self._find_biases()

    def _bias(self, mod: nn.Module) -> bool:
        """Whether the layer has a trainable bias (masked ones included: torch-prune's ``bias`` is computed)."""
        return self._bias_entry(mod) is not None

    def _bias_entry(self, mod: nn.Module):
        return self._biases.get(id(mod))

    def _find_biases(self) -> None:
        self._biases = {id(e.module): e for e in entries(self._model).values() if e.attr == "bias" and not e.frozen}

    def _memory(self, context: FitContext) -> int:
        self._find_biases()                 # each fit: masks may have been installed since
        total = 0
        first = next(batches(context.source), None)
        positions = self._positions(first[0][:1]) if first is not None else {}
        for mod in self._layers.values():
            a = mod.weight[0].numel() + self._bias(mod)
            out, T = mod.weight.shape[0], positions.get(mod, 1)
            # factors, eigenvectors, eigenvalues and the inverse diagonal; a chunk's unfolded inputs and
            # one output-space column's gradients (the columns are taken one at a time)
            total += 3 * (a * a + out ** 2) + 3 * out * a
            total += 2 * 512 * T * (a + out) + self._extra_memory(T, out, a)
        return 8 * total + (64 << 20)

    def _extra_memory(self, positions: int, out: int, features: int) -> int:
        """Further float64 entries a subclass's fit holds per layer (EK-FAC's per-sample gradients)."""
        return 0

    def _positions(self, probe: Tensor) -> dict[nn.Module, int]:
        """Output positions ``T`` of each layer, from one sample."""
        seen = {}

        def count(mod, inp, out):
            seen[mod] = _patches(mod, inp[0].detach()).shape[1]

        handles = [m.register_forward_hook(count) for m in self._layers.values()]
        try:
            with torch.no_grad(), eval_mode(self._model):
                self._model(probe)
        finally:
            for h in handles:
                h.remove()
        return seen

    def _chunks(self, context: FitContext):
        """Per chunk of at most 512 rows: its size, each layer's input rows ``a``
        (``(m, T, features [+1])``, the bias's 1 appended), and an iterator over the output-space
        factor columns ``c`` that yields, for each, ``{layer: (m, T, out)}``: the column
        back-propagated to each layer's output (``None`` where the output does not depend on the
        layer). The columns are computed one at a time, when the iterator is advanced, so only one
        is held; consume it before the next chunk."""
        fm = self._fm
        mods = {mod: n for n, mod in self._layers.items()}
        order = list(mods)
        factor_of = None
        for X, y in batches(context.source):
            for s in range(0, len(y), 512):
                xb, yb = cast_inputs(X[s:s + 512], torch.float64), y[s:s + 512].cpu()
                inputs, outputs, out = self._capture(fm, mods, xb)
                missing = [n for m, n in mods.items() if m not in inputs]
                if missing:
                    raise ValueError(f"estimator {self.name!r}: the layers {missing} are not called in the forward "
                                     "pass, so they have no curvature; leave them out of params=")
                shape = out.shape[1:]
                C = max(1, int(shape.numel()))
                out = out.reshape(len(xb), C)
                if factor_of is None:
                    factor_of = output_factor(context.loss, shape)
                L = factor_of(out.detach(), yb)

                def columns(out=out, L=L, outputs=outputs, C=C):
                    for c in range(C):
                        gs = torch.autograd.grad((out * L[:, :, c]).sum(), [outputs[m] for m in order],
                                                 retain_graph=c < C - 1, allow_unused=True)
                        col = {}
                        for m, g in zip(order, gs):
                            if g is not None:
                                if isinstance(m, nn.Linear):     # (m, ..., out): every leading position a row
                                    g = g.reshape(len(g), -1, g.shape[-1])
                                else:                           # (m, out, *spatial)
                                    g = g.reshape(len(g), g.shape[1], -1).transpose(1, 2)
                            col[mods[m]] = g
                        yield col

                layers = {}
                for m in order:
                    a = _patches(m, inputs[m])
                    if self._bias(m):
                        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], 2)
                    layers[mods[m]] = a
                yield len(yb), layers, columns()

    def _build(self, context: FitContext) -> None:
        A = {n: 0.0 for n in self._layers}
        B = {n: 0.0 for n in self._layers}
        positions = {}
        seen = 0
        for size, inputs, columns in self._chunks(context):
            seen += size
            for col in columns:
                for n, g in col.items():
                    if g is not None:
                        g = g.reshape(-1, g.shape[-1])
                        B[n] = B[n] + g.T @ g
            for n, a in inputs.items():
                positions[n] = a.shape[1]
                a = a.reshape(-1, a.shape[2])
                A[n] = A[n] + a.T @ a
        self._factors, self._eigen, self._cg = {}, {}, {}
        bases = {}
        for n, mod in self._layers.items():
            # A is a mean over the rows seen; B a sum, scaled to the n training rows (FitContext(n=...))
            a_mat = A[n] / (seen * positions[n])
            b_mat = (B[n] if isinstance(B[n], Tensor) else torch.zeros(mod.weight.shape[0], mod.weight.shape[0],
                                                                       dtype=torch.float64)) * (context.n / seen)
            alpha, QA = torch.linalg.eigh(0.5 * (a_mat + a_mat.T))
            beta, QB = torch.linalg.eigh(0.5 * (b_mat + b_mat.T))
            bases[n] = (QA, QB, alpha, beta, a_mat, b_mat)
        eigen = self._eigenvalues(context, bases)
        for n, (QA, QB, _, _, a_mat, b_mat) in bases.items():
            denom = eigen[n] + self._d
            if bool((denom <= 0).any()):
                raise ValueError(f"estimator {self.name!r}: layer {n!r} has directions without curvature and there is "
                                 "no weight decay; pass damping=delta > 0 or train with weight decay")
            self._factors[n] = (QA, QB, denom, a_mat, b_mat)
            self._eigen[n] = eigen[n]

    def _eigenvalues(self, context: FitContext, bases: dict) -> dict[str, Tensor]:
        """The curvature's eigenvalues in each layer's Kronecker eigenbasis, ``(out, features)``:
        K-FAC's products :math:`\\beta_k \\alpha_l` (EK-FAC overrides this)."""
        return {n: beta.clamp_min(0)[:, None] * alpha.clamp_min(0)[None, :]
                for n, (_, _, alpha, beta, _, _) in bases.items()}

    def _capture(self, fm, mods: dict[nn.Module, str], xb: Tensor):
        """One forward pass with a graph: each layer's input and (differentiable) output, and the model's output."""
        inputs, outputs = {}, {}

        def keep(mod, inp, out):
            if mod in inputs:
                raise ValueError(f"estimator {self.name!r}: layer {mods[mod]!r} is applied more than once per forward "
                                 "pass; use se='block'")
            inputs[mod], outputs[mod] = inp[0].detach(), out

        handles = [m.register_forward_hook(keep) for m in mods]
        try:
            with torch.enable_grad():
                leaves = {n: v.detach().requires_grad_() for n, v in fm.params(list(self._layers)).items()}
                out = fm(leaves, xb)
        finally:
            for h in handles:
                h.remove()
        return inputs, outputs, out

    def _inverse_diagonal(self) -> dict[str, Tensor]:
        out = {}
        for n, (QA, QB, denom, _, _) in self._factors.items():
            full = QB.square() @ denom.reciprocal() @ QA.square().T           # (out, in [+1])
            w = self._layers[n].weight
            out[n] = full[:, : w[0].numel()].reshape(w.shape)
        return out

    def _block_names(self) -> list[str]:
        names = list(self._layers)
        for mod in self._layers.values():
            if self._bias(mod):
                names.append(self._bias_name(mod))
        return names

    def _bias_name(self, mod: nn.Module) -> str:
        # from the entry table: a masked (parametrized or torch-pruned) bias is not a plain parameter
        return self._bias_entry(mod).name

    def _solve(self, psi: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for n, (QA, QB, denom, _, _) in self._factors.items():
            mod = self._layers[n]
            g = psi[n].reshape(len(psi[n]), mod.weight.shape[0], -1)
            if self._bias(mod):
                g = torch.cat([g, psi[self._bias_name(mod)].reshape(len(g), -1, 1)], 2)
            sol = QB @ ((QB.T @ g @ QA) / denom) @ QA.T
            out[n] = sol[:, :, : mod.weight[0].numel()].reshape(len(g), *mod.weight.shape)
        return out

    def _kept_solve(self, name: str, weight: Tensor, keep: Tensor, cut: Tensor) -> Tensor:
        # the layer's bias is held fixed: it is a tensor of its own, outside the update's blocks
        w = weight.reshape(weight.shape[0], -1)
        k = w.shape[1]
        keep, cut = keep.reshape(w.shape), cut.reshape(w.shape)
        if self.obs_block == "layer":
            return self._layer_solve(name, w, keep, cut).view_as(weight)
        out = w.clone()
        eye = torch.eye(k, dtype=torch.float64)
        for o in torch.nonzero(cut.any(1)).flatten().tolist():
            out[o] = kept_solve(self._row_block(name, o, k) + self._d * eye, w[o], keep[o], cut[o], ridge=self._d)
        return out.view_as(weight)

    def _row_block(self, name: str, o: int, k: int) -> Tensor:
        """Output row ``o``'s block of the curvature over its first ``k`` inputs, cross-row terms
        dropped and without the damping: K-FAC's ``B_oo A``."""
        _, _, _, a_mat, b_mat = self._factors[name]
        return b_mat[o, o] * a_mat[:k, :k]

    def _layer_solve(self, name: str, w: Tensor, keep: Tensor, cut: Tensor) -> Tensor:
        r"""The whole layer's compensating update, :math:`\Delta_K = H_{KK}^{-1} H_{KQ} w_Q` with
        :math:`H` the layer's full Kronecker-structured curvature (cross-row terms kept), by
        conjugate gradients with a Jacobi preconditioner: each product with :math:`H` costs two
        small matrix products in the eigenbasis, so the ``out*in`` system is never formed."""
        QA, QB, _, _, _ = self._factors[name]
        s, d = self._eigen[name], self._d
        k = w.shape[1]
        QAw = QA[:k]
        K = keep.to(torch.float64)

        def H(V: Tensor) -> Tensor:
            return QB @ ((QB.T @ V @ QAw) * s) @ QAw.T + d * V

        rhs = K * H(w * cut)
        diag = (QB.square() @ s @ QAw.square().T + d) * K + (1 - K)
        x = torch.zeros_like(w)
        r = rhs.clone()
        z = r / diag
        p = z.clone()
        rz = (r * z).sum()
        target = self.cg_tol * float(rhs.norm())
        iters = 0
        while float(r.norm()) > target and iters < self.cg_max_iter:
            Hp = K * H(p)
            step = rz / (p * Hp).sum()
            x += step * p
            r -= step * Hp
            z = r / diag
            rz, rz_old = (r * z).sum(), rz
            p = z + (rz / rz_old) * p
            iters += 1
        residual = float(r.norm()) / max(float(rhs.norm()), 1e-300)
        self._cg[name] = (iters, residual)
        if residual > self.cg_tol:
            warnings.warn(f"estimator {self.name!r}: the layer update of {name!r} stopped after {iters} conjugate-"
                          f"gradient iterations at relative residual {residual:.1e} (cg_tol={self.cg_tol:g}); raise "
                          "cg_max_iter or use obs_block='row'", RuntimeWarning, stacklevel=5)
        return torch.where(keep, w + x, w)

    def diagnostics(self) -> dict:
        out = {**super().diagnostics(), "obs_block": self.obs_block}
        if self._cg:
            out["cg"] = dict(self._cg)
        return out
