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
factors). Both factors are eigendecomposed in float64 (``torch.linalg.eigh``, once per factor), :math:`A = Q_A \mathrm{diag}(\alpha) Q_A^\top`,
:math:`B = Q_B \mathrm{diag}(\beta) Q_B^\top`, and the diagonal of
:math:`(B \otimes A + d I)^{-1}` with :math:`d = n(\lambda + \delta)` is exact:

.. math:: [(B\otimes A + dI)^{-1}]_{(o,j),(o,j)} = \sum_{k,l} \frac{Q_{B,ok}^2\, Q_{A,jl}^2}{\beta_k \alpha_l + d}.

When a layer sees fewer input rows :math:`N = nT` than it has features :math:`f` (a wide
``nn.Linear`` on a small data set: the MNIST-example CNN's fc1 has 9,217 inputs), :math:`A = X^\top X`
(:math:`X` the scaled rows) has rank at most :math:`N`. Its nonzero eigenpairs then come from the
:math:`N \times N` Gram matrix, :math:`X X^\top = U \mathrm{diag}(\alpha) U^\top`,
:math:`Q_A = X^\top U \mathrm{diag}(\alpha)^{-1/2}` (:math:`O(N^2 f)` instead of :math:`O(f^3)`;
eigenvalues below rounding, :math:`\alpha_l \le f\,\epsilon\,\alpha_{\max}`, count as 0, as a full
eigendecomposition would resolve them), and the directions outside :math:`Q_A`'s columns have
eigenvalue 0: they add :math:`(1 - \sum_l Q_{A,jl}^2)/d` to each diagonal entry (which needs
:math:`d > 0`). ``tests/test_kfac.py`` checks this route against the dense inverse and against
the full eigendecomposition (SEs, sandwich and the compensating update).

The forward and backward passes run in float64 (``pass_dtype="float64"``) or in the model's own
dtype (``pass_dtype="model"``: for a float32 model about twice as fast; each chunk's products in
float32, their sums across chunks and everything after in float64; SEs within 3e-4 relative of
the float64 passes on the MNIST-example CNN, ``benchmarks/kfac_cnn.py``). :meth:`KFAC.cost` gives
the time and memory from the shapes before any work; a fit estimated at more than a few seconds
says so and shows progress bars (``progress=``).

The bias is marginalised over (re-fitted), not held fixed. The approximation is exact for a
linear-Gaussian layer (one output, :math:`\Lambda = 1`); in general it assumes inputs and
output gradients independent. Masks are not part of the factors (pruned entries keep their
place in the Kronecker basis); the compensating update respects them exactly.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable
from numbers import Integral, Real

import torch
from torch import Tensor, nn
from tqdm import tqdm

from mustat._checks import check_option, check_scalar
from mustat._functional import FunctionalModel, eval_mode
from mustat._params import entries
from mustat.batching import batches
from mustat.cost import Cost, machine_flops
from mustat.layers import MATRIX_TYPES, patches
from mustat.obs import kept_cg, kept_solve
from mustat.statistics import Gram, input_statistic
from mustat.uncertainty.base import FitContext, register_estimator
from mustat.uncertainty.curvature import output_factor
from mustat.uncertainty.marginal import Marginal, cast_inputs

_LAYERS = MATRIX_TYPES   # the layers the matrix view unfolds, listed once in mustat.layers
#: the compensating update's blocks: each output row (cross-row terms dropped) or the whole layer
OBS_BLOCKS = ("row", "layer")
#: the dtype of the forward and backward passes that collect the factors: ``"float64"``, or
#: ``"model"``, the model's own (float32 for a float32 or half-precision model: about twice as
#: fast; the factors are still summed across chunks and decomposed in float64)
PASS_DTYPES = ("float64", "model")


@register_estimator("kfac")
class KFAC(Marginal):
    """Kronecker-factored marginal SEs (module notes) for the weights of ``nn.Linear``,
    ``nn.Conv1d`` and ``nn.Conv2d`` layers (``groups=1``; any padding: the input factor reads the
    patches of :func:`mustat.layers.patches`), each applied
    once per forward pass (a Linear layer may see sequences: its positions are the ``T``).
    Other tensors: an error offering ``block``.

    Parameters
    ----------
    max_memory : int
        Bytes the fit may take (:meth:`cost`, checked before any work); more is a ValueError
        offering the diagonal ``curvature`` estimator.
    pass_dtype : {"float64", "model"}
        The dtype of the forward and backward passes that collect the factors (module notes).
    mc_samples : int or None
        ``None``: the exact output factor (one backward pass per model output ``C``: 10 for a
        10-class classifier). An integer ``k``: a Monte-Carlo output factor from ``k`` backward
        passes, ``L xi / sqrt(k)`` with ``xi`` standard normal ``(C, k)`` per sample (``E[L xi
        xi^T L^T] = L L^T``: unbiased for each sample's output Hessian, so ``B`` and EK-FAC's
        eigenvalues are unbiased, with a sampling error that falls as ``1 / sqrt(k n)``); about
        ``C / k`` times faster; ``k >= C`` is the exact factor. ``kfac-mc`` is ``k = 1`` (curvlinops' ``fisher_type="mc"`` draws
        labels instead; both are unbiased for the same factor).
    seed : int
        The draws of ``mc_samples`` (a CPU generator: the same on every machine).
    progress : bool or None
        ``None``: when :meth:`cost` estimates more than
        :data:`~mustat.cost.LONG_FIT_SECONDS`, print the estimate to stderr before the
        fit and show progress bars; ``True``: always; ``False``: never (the estimate still goes
        to the ``mustat.uncertainty`` logger).
    """

    cheaper = "curvature"
    #: passes over the data (EK-FAC makes a second one)
    _passes = 1
    #: decompose a layer with fewer input rows than features through the rows' Gram matrix (the
    #: tests turn it off to compare with the full eigendecomposition)
    _gram_route = True
    #: ``kfac-damped``: damping 1e-4 in weight-decay units, for a model trained without weight decay
    #: (whose curvature is singular: constant inputs, dead units)
    variants = {"kfac-sandwich": {"kind": "sandwich"}, "kfac-layer": {"obs_block": "layer"},
                "kfac-damped": {"damping": 1e-4}, "kfac-mc": {"mc_samples": 1}}

    def __init__(self, model: nn.Module, *, kind: str = "observed", damping: float = 0.0,
                 params: Iterable[str] | None = None, obs_block: str = "row", cg_tol: float = 1e-10,
                 cg_max_iter: int = 5000, max_memory: int = 4 << 30, pass_dtype: str = "float64",
                 mc_samples: int | None = None, seed: int = 0, progress: bool | None = None):
        super().__init__(model, kind=kind, damping=damping, params=params, max_memory=max_memory, progress=progress)
        self.pass_dtype = check_option(pass_dtype, "pass_dtype", PASS_DTYPES)
        self.mc_samples = None if mc_samples is None else int(check_scalar(mc_samples, "mc_samples", kind=Integral,
                                                                             low=1))
        self.seed = int(check_scalar(seed, "seed", kind=Integral))
        self._show = False
        self._has_bias: dict[str, bool] = {}
        self.obs_block = check_option(obs_block, "obs_block", OBS_BLOCKS)
        self.cg_tol = float(check_scalar(cg_tol, "cg_tol", kind=Real, low=0.0, high=1.0, closed="neither"))
        self.cg_max_iter = int(check_scalar(cg_max_iter, "cg_max_iter", kind=Integral, low=1))
        self._cg: dict[str, tuple[int, float]] = {}
        self._layers: dict[str, nn.Module] = {}
        for n, e in zip(self.names, self._entries):
            mod = e.module
            if e.tied or e.attr != "weight" or not isinstance(mod, _LAYERS) or getattr(mod, "groups", 1) != 1:
                raise ValueError(
                    f"estimator {self.name!r} factors the weights of nn.Linear, nn.Conv1d and nn.Conv2d layers (groups=1, "
                    f"used once), not {n!r} ({type(mod).__name__}.{e.attr}); use se='block' "
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
        return self.cost(context).bytes

    def _extra_memory(self, positions: int, out: int, features: int) -> int:
        """Further float64 entries a subclass's fit holds per layer (EK-FAC's per-sample gradients)."""
        return 0

    def _extra_flops(self, n: int, positions: int, out: int, features: int, rank: int, columns: int) -> dict:
        """``{stage: (flops, efficiency)}`` a subclass's fit adds per layer (EK-FAC's second pass)."""
        return {}

    def _shapes(self, context: FitContext) -> tuple[dict, int, int]:
        """Per layer ``(positions T, out, features [+1])``, the model's output size ``C`` and the
        forward flops of one sample, from a forward pass on one sample."""
        first = next(batches(context.source), None)
        if first is None:
            return {n: (1, m.weight.shape[0], m.weight[0].numel() + self._bias(m)) for n, m in self._layers.items()}, 1, 0
        seen, out = self._positions(first[0][:1], with_output=True)
        shapes = {n: (seen.get(m, 1), m.weight.shape[0], m.weight[0].numel() + self._bias(m))
                  for n, m in self._layers.items()}
        return shapes, max(1, int(out.shape[1:].numel())), sum(2 * T * o * f for T, o, f in shapes.values())

    def _chunk_rows(self, shapes: dict, columns: int) -> int:
        """Samples per chunk: at most 512, and about 512 MiB of unfolded inputs and one output-space
        column's gradients (a convolution's patches are its positions times its features per sample)."""
        per = 8 * sum(T * (f + 2 * o) for T, o, f in shapes.values())
        return int(max(1, min(512, (512 << 20) // max(1, per))))

    def cost(self, context: FitContext) -> Cost:
        """The fit's memory and time from the layers' shapes and ``context.n`` (:class:`Cost`):
        one forward pass and ``C`` backward passes per chunk (``C`` the model's outputs), the
        factors' products, one eigendecomposition per factor (of the ``N x N`` Gram matrix when a
        layer sees ``N = n T`` rows, fewer than its features) and the inverse diagonal."""
        self._find_biases()                 # each fit: masks may have been installed since
        shapes, C, forward = self._shapes(context)
        C = min(C, self.mc_samples or C)      # backward passes per chunk
        n = int(context.n or 0)
        m = min(self._chunk_rows(shapes, C), max(1, n))
        rate = machine_flops()
        parts: dict[str, float] = {}
        flops = 0.0

        def add(stage: str, f: float, efficiency: float) -> None:
            nonlocal flops
            flops += f
            parts[stage] = parts.get(stage, 0.0) + f / (rate * efficiency)

        # the passes run below the float64 matrix-product rate (convolutions on unfolded inputs,
        # copies), float32 ones about twice as fast: a forward pass and C backward passes, each
        # about twice the forward's flops
        speed = 2.0 if self._pass_dtype() == torch.float32 else 1.0
        add("data pass", self._passes * n * forward * (1 + 2 * C), 0.5 * speed)
        factor_entries, peak, chunk = 0, 0, 0
        for T, o, f in shapes.values():
            N = n * T
            low = self._gram_route and N < f     # the Gram matrix of the rows is the smaller eigenproblem
            r = min(N, f) if low else f
            add("data pass", 2 * C * N * o * o + (0 if low else 2 * N * f * f), 1.0 * speed)
            if low:
                add("eigendecompositions", 2 * N * N * f + 2 * N * f * r, 1.0)
                add("eigendecompositions", 9 * N**3, 0.5)
            else:
                add("eigendecompositions", 9 * f**3, 0.5)
            add("eigendecompositions", 9 * o**3, 0.5)
            add("inverse diagonal", 2 * o * r * (o + f), 1.0)
            for stage, (fl, eff) in self._extra_flops(n, T, o, f, r, C).items():
                add(stage, fl, eff)
            # kept: the factor A (or the rows it is made of), its eigenvectors, B and its eigenvectors,
            # the eigenvalues and the denominators
            held = (N * f if low else f * f) + f * r + 2 * o * o + 2 * o * r
            factor_entries += held
            # while one layer is decomposed: A's symmetrised copy and eigh's workspace, or the Gram
            # matrix and its eigenvectors, and the inverse diagonal's squares
            peak = max(peak, (2 * N * N if low else 2 * f * f) + f * r + o * f)
            chunk += m * T * (f + 2 * o) + self._extra_memory(T, o, f)
        total = 8 * (factor_entries + max(peak, chunk)) + (64 << 20)
        seconds = sum(parts.values())
        note = ""
        if speed == 1.0 and self.pass_dtype == "float64" and {p.dtype for p in self._model.parameters()} == {torch.float32}:
            faster = seconds - parts.get("data pass", 0.0) / 2
            note = f"pass_dtype='model' (float32 passes) would take about {faster:.2g} s"
        return Cost(bytes=int(total), seconds=seconds, flops=flops, parts=tuple(parts.items()),
                    factor_bytes=8 * factor_entries, note=note)

    def _positions(self, probe: Tensor, with_output: bool = False):
        """Output positions ``T`` of each layer, from one sample (and the model's output)."""
        seen = {}

        def count(mod, inp, out):
            seen[mod] = patches(mod, inp[0].detach()).shape[2]

        handles = [m.register_forward_hook(count) for m in self._layers.values()]
        try:
            with torch.no_grad(), eval_mode(self._model):
                out = self._model(probe)
        finally:
            for h in handles:
                h.remove()
        return (seen, out) if with_output else seen

    def _pass_dtype(self) -> torch.dtype:
        if self.pass_dtype == "float64":
            return torch.float64
        dtypes = {p.dtype for p in self._model.parameters() if p.is_floating_point()}
        if len(dtypes) != 1:
            return torch.float64
        # half-precision models still pass in float32: their CPU kernels are slow and the factors lose too much
        return torch.float64 if dtypes == {torch.float64} else torch.float32

    def _chunks(self, context: FitContext, what: str = "factors"):
        """Per chunk of samples (:meth:`_chunk_rows`): its size, each layer's inputs ``a``
        (``(m, features, T)``, without the bias's 1: :meth:`_with_one` appends it), and an
        iterator over the output-space factor columns ``c`` that yields, for each,
        ``{layer: (m, out, T)}``: the column back-propagated to each layer's output (``None``
        where the output does not depend on the layer). The columns are computed one at a time,
        when the iterator is advanced, so only one is held; consume it before the next chunk.
        The passes run in :attr:`pass_dtype`; a progress bar counts the samples when the fit
        was announced as long."""
        dtype = self._pass_dtype()
        fm = self._fm if dtype == torch.float64 else FunctionalModel(self._model, dtype=dtype, device="cpu")
        mods = {mod: n for n, mod in self._layers.items()}
        order = list(mods)
        factor_of = None
        shapes, C, _ = self._shapes(context)
        step = self._chunk_rows(shapes, C)
        draws = torch.Generator().manual_seed(self.seed)
        bar = tqdm(total=context.n, desc=f"{self.name}: {what}", unit="sample", disable=not self._show,
                   file=sys.stderr, leave=False)
        try:
            for X, y in batches(context.source):
                for s in range(0, len(y), step):
                    xb, yb = cast_inputs(X[s:s + step], dtype), y[s:s + step].cpu()
                    inputs, outputs, out = self._capture(fm, mods, xb)
                    missing = [n for m, n in mods.items() if m not in inputs]
                    if missing:
                        raise ValueError(f"estimator {self.name!r}: the layers {missing} are not called in the "
                                         "forward pass, so they have no curvature; leave them out of params=")
                    shape = out.shape[1:]
                    C = max(1, int(shape.numel()))
                    out = out.reshape(len(xb), C)
                    if factor_of is None:
                        factor_of = output_factor(context.loss, shape)
                    L = factor_of(out.detach(), yb)
                    if self.mc_samples is not None and self.mc_samples < C:
                        xi = torch.randn(len(xb), C, self.mc_samples, generator=draws, dtype=torch.float64)
                        L = (L.to(torch.float64) @ xi / self.mc_samples ** 0.5).to(L.dtype)

                    def columns(out=out, L=L, outputs=outputs, C=L.shape[2]):
                        # one backward pass per column (batching them with is_grads_batched was slower
                        # on the MNIST-example CNN: 2.9 s against 2.0 s for 256 samples, float64)
                        targets = [outputs[m] for m in order]
                        for c in range(C):
                            gs = torch.autograd.grad((out * L[:, :, c]).sum(), targets, retain_graph=c < C - 1,
                                                     allow_unused=True)
                            col = {}
                            for m, g in zip(order, gs):
                                if g is not None:
                                    if isinstance(m, nn.Linear):     # (m, ..., out): every leading position
                                        g = g.reshape(len(g), -1, g.shape[-1]).transpose(1, 2)
                                    else:                           # (m, out, *spatial)
                                        g = g.reshape(len(g), g.shape[1], -1)
                                col[mods[m]] = g
                            yield col

                    yield len(yb), {mods[m]: patches(m, inputs[m]) for m in order}, columns()
                    bar.update(len(yb))
        finally:
            bar.close()

    def _with_one(self, name: str, a: Tensor, dim: int = -1) -> Tensor:
        """Inputs with the bias's 1 appended along ``dim`` (the features) when the layer has a bias."""
        if not self._has_bias[name]:
            return a
        shape = list(a.shape)
        shape[dim] = 1
        return torch.cat([a, a.new_ones(shape)], dim)

    def _build(self, context: FitContext) -> None:
        self._has_bias = {n: self._bias(mod) for n, mod in self._layers.items()}
        A: dict[str, Gram | None] = {n: None for n in self._layers}
        B: dict[str, Tensor | None] = {n: None for n in self._layers}
        # a layer's input rows are kept while they are fewer than its features: A = X^T X / N then has
        # rank <= N, and the N x N Gram matrix X X^T gives its eigenvectors at a fraction of the cost
        rows: dict[str, list | None] = {n: [] if self._gram_route else None for n in self._layers}
        positions = {}
        seen = 0
        for size, inputs, columns in self._chunks(context):
            seen += size
            for col in columns:
                for n, g in col.items():
                    if g is not None:
                        g = input_statistic(g)
                        B[n] = g if B[n] is None else B[n].add_(g)
            for n, a in inputs.items():
                positions[n] = a.shape[2]
                f = a.shape[1] + self._has_bias[n]
                if rows[n] is not None:
                    rows[n].append(self._with_one(n, a.transpose(1, 2).reshape(-1, a.shape[1]).to(torch.float64)))
                    if sum(len(r) for r in rows[n]) < f:
                        continue
                    kept, rows[n] = torch.cat(rows[n]), None
                    A[n] = Gram(a.shape[1], a.device, bias=self._has_bias[n])
                    A[n].add(kept[:, :a.shape[1]])
                    continue
                if A[n] is None:
                    A[n] = Gram(a.shape[1], a.device, bias=self._has_bias[n])
                A[n].add(a)
        self._factors, self._eigen, self._cg, self._rows, self._a_cache = {}, {}, {}, {}, {}
        bases = {}
        eps = torch.finfo(torch.float64).eps
        bar = tqdm(self._layers.items(), desc=f"{self.name}: eigendecompositions", unit="layer",
                   disable=not self._show, file=sys.stderr, leave=False)
        for n, mod in bar:
            # A is a mean over the rows seen; B a sum, scaled to the n training rows (FitContext(n=...))
            total = seen * positions[n]
            b_mat = (B[n] if B[n] is not None else torch.zeros(mod.weight.shape[0], mod.weight.shape[0],
                                                               dtype=torch.float64)) * (context.n / seen)
            if rows[n] is not None:
                X = torch.cat(rows[n]) / total ** 0.5           # A = X^T X, X X^T = U diag(alpha) U^T
                alpha, U = torch.linalg.eigh(X @ X.T)
                # directions below rounding (as a full eigendecomposition would resolve them) count as null
                keep = alpha > alpha.max().clamp_min(0) * X.shape[1] * eps
                alpha = alpha[keep]
                QA = X.T @ (U[:, keep] / alpha.sqrt())
                self._rows[n], a_mat = X, None
            else:
                a_mat = A[n].H / total
                alpha, QA = torch.linalg.eigh(0.5 * (a_mat + a_mat.T))
            beta, QB = torch.linalg.eigh(0.5 * (b_mat + b_mat.T))
            bases[n] = (QA, QB, alpha, beta, a_mat, b_mat)
        eigen = self._eigenvalues(context, bases)
        for n, (QA, QB, _, _, a_mat, b_mat) in bases.items():
            denom = eigen[n] + self._d
            if bool((denom <= 0).any()) or (QA.shape[1] < QA.shape[0] and self._d <= 0):
                raise ValueError(f"estimator {self.name!r}: layer {n!r} has directions without curvature and there is "
                                 "no weight decay; pass damping=delta > 0 or train with weight decay")
            self._factors[n] = (QA, QB, denom, a_mat, b_mat)
            self._eigen[n] = eigen[n]

    def _a_matrix(self, name: str) -> Tensor:
        """The factor ``A`` of a layer (formed from its kept rows when it was decomposed through them)."""
        a_mat = self._factors[name][3]
        if a_mat is None:
            if name not in self._a_cache:
                X = self._rows[name]
                self._a_cache[name] = X.T @ X
            a_mat = self._a_cache[name]
        return a_mat

    def _eigenvalues(self, context: FitContext, bases: dict) -> dict[str, Tensor]:
        """The curvature's eigenvalues in each layer's Kronecker eigenbasis, ``(out, rank of A)``:
        K-FAC's products :math:`\beta_k \alpha_l` (EK-FAC overrides this); directions outside
        the columns of ``Q_A`` have eigenvalue 0."""
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
            if QA.shape[1] < QA.shape[0]:
                # the directions outside Q_A's columns have eigenvalue 0, so 1/d, and the rows of Q_B
                # are unit vectors: their share of each diagonal entry is (1 - |Q_A[j]|^2) / d
                full += (1 - QA.square().sum(1)).clamp_min(0)[None, :] / self._d
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
            gQ = g @ QA
            sol = QB @ ((QB.T @ gQ) / denom) @ QA.T
            if QA.shape[1] < QA.shape[0]:       # eigenvalue 0 outside Q_A's columns (module notes)
                sol += (g - gQ @ QA.T) / self._d
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
        b_mat = self._factors[name][4]
        return b_mat[o, o] * self._a_matrix(name)[:k, :k]

    def _layer_solve(self, name: str, w: Tensor, keep: Tensor, cut: Tensor) -> Tensor:
        r"""The whole layer's compensating update, :math:`\Delta_K = H_{KK}^{-1} H_{KQ} w_Q` with
        :math:`H` the layer's full Kronecker-structured curvature (cross-row terms kept), by
        conjugate gradients with a Jacobi preconditioner: each product with :math:`H` costs two
        small matrix products in the eigenbasis, so the ``out*in`` system is never formed."""
        QA, QB, _, _, _ = self._factors[name]
        s, d = self._eigen[name], self._d
        QAw = QA[:w.shape[1]]

        def H(V: Tensor) -> Tensor:
            return QB @ ((QB.T @ V @ QAw) * s) @ QAw.T + d * V

        diag = QB.square() @ s @ QAw.square().T + d
        out, iters, residual = kept_cg(H, diag, w, keep, cut, tol=self.cg_tol, max_iter=self.cg_max_iter)
        self._cg[name] = (iters, residual)
        if residual > self.cg_tol:
            warnings.warn(f"estimator {self.name!r}: the layer update of {name!r} stopped after {iters} conjugate-"
                          f"gradient iterations at relative residual {residual:.1e} (cg_tol={self.cg_tol:g}); raise "
                          "cg_max_iter or use obs_block='row'", RuntimeWarning, stacklevel=5)
        return out

    def diagnostics(self) -> dict:
        out = {**super().diagnostics(), "obs_block": self.obs_block}
        if self._cg:
            out["cg"] = dict(self._cg)
        return out
