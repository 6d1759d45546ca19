r"""The rescaling gauge of positively homogeneous hidden units, and its balanced point.

A hidden unit :math:`j` whose activation is positively homogeneous (:math:`\phi(cz) = c\,\phi(z)`
for :math:`c > 0`: ReLU, LeakyReLU, and max or average pooling and dropout between the layers)
computes the same function when its incoming weights and bias are multiplied by :math:`c` and its
outgoing weights divided by :math:`c`: each unit has an orbit :math:`(c\,a_j, c\,b_j, v_j / c)`
along which every sample's loss is constant. Per-weight standard errors exist only once a point of
each orbit is chosen (a gauge). The L2 penalty chooses one: among the orbit, its optimum sits at
the point of least :math:`\|\theta\|^2`, where :math:`\|(a_j, b_j)\| = \|v_j\|` (*balanced*),
because the penalty's derivative along the orbit, :math:`\lambda(\|(a_j, b_j)\|^2 - \|v_j\|^2)`,
must vanish there. An optimizer does not stay there: Adam's per-coordinate preconditioner moves the
iterates along the orbit, which the data cannot see and only the weak penalty pulls back.

:func:`balanced` maps weights to their orbit's balanced point without changing the function; a
trajectory estimator with ``gauge="balanced"`` maps every snapshot before accumulating it, so its
SE and its interval centre describe the penalised optimum's gauge (what the exact Wald and
sandwich references at that optimum describe), not the optimizer's wandering.

The balanced point minimises :math:`\sum_\ell \|W_\ell\|^2 + \|b_\ell\|^2` over the scales
:math:`c > 0` of every hidden unit: a strictly convex problem in :math:`\log c` (a sum of
exponentials of linear functions), solved by block coordinate descent over layers, each block in
closed form (:math:`c_j = (\|v_j\| / \|(a_j, b_j)\|)^{1/2}`, one unit's incoming and outgoing
norms given the other layers' scales). One hidden layer is one exact step; deeper chains iterate
until a sweep changes no :math:`\log c` by more than ``tol`` (a warning if ``max_iter`` sweeps do
not get there). Biases count in the norm, as they do under PyTorch's ``weight_decay`` on
``model.parameters()``: the balanced point is the penalised optimum's gauge only when every weight
and bias gets the same decay. Parameter groups that leave biases undecayed have another balance
(incoming weights alone), which this module does not offer. A unit with no incoming or no outgoing weight (dead, or
pruned away) has no balanced point and keeps its scale.

What is covered: chains of ``nn.Linear`` layers, or of convolutions of one kind (``Conv1d``,
``Conv2d``, ``Conv3d``), inside one ``nn.Sequential``, with only positively homogeneous modules
between two layers; a convolution followed by ``nn.Flatten`` and a Linear (each channel owns a
contiguous block of the Linear's inputs). Anything else ends a chain: smooth activations (tanh,
softplus, GELU) have no continuous rescaling symmetry, so their weights are already identified
up to permutation and are left unchanged; BatchNorm makes its incoming weights scale-invariant, a
different symmetry that no rescaling across layers fixes; residual sums couple units of several
layers and are not followed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import Tensor, nn

from mustat._checks import check_scalar
from mustat._params import PRUNABLE_TYPES, entries

#: modules through which a positive rescaling of the channels passes unchanged
HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
               nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
               nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d,
               nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_LAYERS = PRUNABLE_TYPES   # the weight layers, listed once in mustat._params


@dataclass(frozen=True)
class Chain:
    """Consecutive layers (named as in :mod:`mustat._params`: ``"1"`` for ``model[1]``) whose
    hidden units each have a rescaling orbit; ``block[i]`` is how many inputs of layer ``i + 1``
    each unit of layer ``i`` feeds (1, or a flattened channel's size)."""

    layers: tuple[str, ...]
    block: tuple[int, ...]


def _compatible(a: nn.Module, b: nn.Module, flattened: bool) -> int | None:
    """Inputs of ``b`` per output unit of ``a`` when units pass from one to the other, else None."""
    if isinstance(a, nn.Linear):
        return 1 if isinstance(b, nn.Linear) and a.out_features == b.in_features else None
    if getattr(a, "groups", 1) != 1:
        return None
    if flattened:
        ok = isinstance(b, nn.Linear) and b.in_features % a.out_channels == 0
        return b.in_features // a.out_channels if ok else None
    if type(a) is type(b) and b.groups == 1:
        return 1 if a.out_channels == b.in_channels else None
    return None


def chains(model: nn.Module) -> list[Chain]:
    """Every chain of layers with rescalable hidden units in ``model`` (module notes)."""
    out = []
    for path, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        prefix = f"{path}." if path else ""
        layers, blocks, last, flattened = [], [], None, False
        for name, child in seq.named_children():
            if isinstance(child, _LAYERS):
                block = _compatible(last[1], child, flattened) if last is not None else None
                if block is not None:
                    layers.append(prefix + name)
                    blocks.append(block)
                else:
                    if len(layers) > 1:
                        out.append(Chain(tuple(layers), tuple(blocks)))
                    layers, blocks = [prefix + name], []
                last, flattened = (name, child), False
            elif isinstance(child, nn.Flatten) and last is not None:
                flattened = not isinstance(last[1], nn.Linear)   # after a Linear it changes nothing
            elif not isinstance(child, HOMOGENEOUS):
                if len(layers) > 1:
                    out.append(Chain(tuple(layers), tuple(blocks)))
                layers, blocks, last, flattened = [], [], None, False
        if len(layers) > 1:
            out.append(Chain(tuple(layers), tuple(blocks)))
    return out


def _pair_sq(w: Tensor, block: int) -> Tensor:
    """Squared weights summed to (output unit, feeding unit): kernel taps and a flattened
    channel's ``block`` inputs together."""
    sq = w.square()   # in the weight's dtype, summed in float64: no full-size float64 copy each step
    sq = sq.reshape(sq.shape[0], sq.shape[1], -1).sum(2, dtype=torch.float64)
    return sq.reshape(sq.shape[0], -1, block).sum(2)


def scales(tensors: dict[str, Tensor], chain: Chain, *, tol: float | None = None, max_iter: int = 1000,
           start: list[Tensor] | None = None) -> list[Tensor]:
    """The balanced point's scale ``c`` (float64) of every hidden unit of ``chain``, one vector per
    hidden layer, from the effective ``"<layer>.weight"`` / ``"<layer>.bias"`` in ``tensors``
    (module notes; a missing bias counts as zero). ``tol``: the largest change of any
    ``log c`` in the last sweep; by default 1e-10 for float64 weights and 1e-6 otherwise
    (a relative change of a few float32 ulps). ``start``: scales to begin the descent from (the
    last snapshot's, so that a trajectory needs a few sweeps per step); the answer is the same to
    ``tol``."""
    if tol is None:
        tol = 1e-10 if tensors[f"{chain.layers[0]}.weight"].dtype == torch.float64 else 1e-6
    check_scalar(tol, "tol", kind=Real, low=0.0, closed="neither")
    check_scalar(max_iter, "max_iter", kind=Integral, low=1)
    L = chain.layers
    first = tensors[f"{L[0]}.weight"].square()
    rows0 = first.reshape(first.shape[0], -1).sum(1, dtype=torch.float64)
    pair = [None] + [_pair_sq(tensors[f"{L[i]}.weight"], chain.block[i - 1]) for i in range(1, len(L))]
    bias_sq = []
    for i in range(len(L) - 1):
        b = tensors.get(f"{L[i]}.bias")
        bias_sq.append(b.double().square() if b is not None else torch.zeros_like(pair[i + 1][0]))
    log_c = [torch.zeros_like(b) for b in bias_sq]
    if start is not None and [len(c) for c in start] == [len(b) for b in bias_sq]:
        log_c = [c.to(b).log() for c, b in zip(start, bias_sq)]
    for _ in range(max_iter):
        worst = 0.0
        for i in range(len(log_c)):
            # minimise c^2 A + B / c^2 over this layer's units, the other layers' scales fixed
            A = (rows0 if i == 0 else pair[i] @ torch.exp(-2 * log_c[i - 1])) + bias_sq[i]
            above = torch.exp(2 * log_c[i + 1]) if i + 1 < len(log_c) else torch.ones_like(pair[i + 1][:, 0])
            B = above @ pair[i + 1]
            new = torch.where((A > 0) & (B > 0), 0.25 * (B.clamp_min(1e-300).log() - A.clamp_min(1e-300).log()),
                              torch.zeros_like(A))
            if len(new):
                worst = max(worst, float((new - log_c[i]).abs().max()))
            log_c[i] = new
        if len(log_c) == 1 or worst < tol:
            break
    else:
        warnings.warn(f"balancing {chain.layers} stopped after max_iter={max_iter} sweeps with a last change of "
                      f"{worst:.3g} in log-scale (tol={tol:g}): the scales are approximate", RuntimeWarning,
                      stacklevel=2)
    return [x.exp() for x in log_c]


def factors(tensors: dict[str, Tensor], chain_list: list[Chain], *, warm: dict | None = None,
            **kwargs) -> dict[str, Tensor]:
    """Multipliers that take each tensor of the chains to the balanced point, shaped to broadcast
    against it: rows of a layer times its units' ``c``, columns divided by the ``c`` of the units
    feeding them, a bias times its units' ``c``. ``warm``, a dict the caller keeps, holds each
    chain's last scales to start the next call from (:func:`scales`)."""
    out: dict[str, Tensor] = {}
    for chain in chain_list:
        cs = scales(tensors, chain, start=None if warm is None else warm.get(chain), **kwargs)
        if warm is not None:
            warm[chain] = cs
        for i, name in enumerate(chain.layers):
            w = tensors[f"{name}.weight"]
            # one full-size pass, in the weight's precision (at least float32): this runs every step
            dtype = torch.promote_types(w.dtype, torch.float32)
            rows = cs[i].to(dtype) if i < len(cs) else torch.ones(w.shape[0], dtype=dtype, device=w.device)
            cols = (1 / cs[i - 1].repeat_interleave(chain.block[i - 1])).to(dtype) if i > 0 else \
                torch.ones(w.shape[1], dtype=dtype, device=w.device)
            if i < len(cs) and f"{name}.bias" in tensors:
                out[f"{name}.bias"] = rows
            out[f"{name}.weight"] = (rows[:, None] * cols[None, :]).reshape(*w.shape[:2], *([1] * (w.dim() - 2)))
    return out


def balanced(model: nn.Module, **kwargs) -> dict[str, Tensor]:
    """The effective weights and biases of every chain in ``model`` at their orbit's balanced
    point (same function, module notes), keyed like :mod:`mustat._params` (``"1.weight"``).
    ``model`` is only read."""
    table = entries(model)
    found = chains(model)
    tensors = {k: table[k].effective() for c in found for n in c.layers for k in (f"{n}.weight", f"{n}.bias")
               if k in table}
    return {k: (tensors[k] * f).to(tensors[k].dtype) for k, f in factors(tensors, found, **kwargs).items()}
