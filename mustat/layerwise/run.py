"""The one-shot driver: layers in the order the model calls them, each pruned from calibration
inputs that have passed through the layers already pruned: GPTQ's "true-sequential" order.

Layers that read the very same input tensor (query, key and value; a gated MLP's gate and up
projections) form a *group*: they share a pass and a Gram matrix. A pass over the calibration
batches stops as soon as the group has seen its inputs (an exception raised from a hook), so
nothing is run further than it must be.

Where the layers sit in a list of blocks that feed one another (a transformer's ``ModuleList`` of
layers: block ``k + 1`` called on block ``k``'s output with the same other arguments, checked on
the first batch), the model is run *once per block*, as SparseGPT's and Wanda's drivers run it:
the first block's inputs are captured once, each block's groups are measured by running only
that block on the cached inputs, and the pruned block's outputs become the next block's inputs.
Nothing is recomputed from the embeddings. Elsewhere (an MLP, a CNN) each group takes a pass of
the model from its input.

Only the current group's statistics are held, except with ``scope="global"``, which needs every
layer's scores from one pass over the dense model first to share the sparsity out between layers.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real

import pandas as pd
import psutil
import torch
from torch import Tensor, nn
from tqdm import tqdm

from mustat._checks import check_option, check_scalar
from mustat._params import entries, install_mask
from mustat.cost import Cost, announce, machine_flops
from mustat.layers import Target, find_targets
from mustat.layerwise import solve as S
from mustat.layerwise.allocation import ALLOCATIONS, owl_shares
from mustat.patterns import check_groups, parse_pattern, resolve_sparsity
from mustat.pruning import PruningReport
from mustat.statistics import (
    Call,
    Collector,
    Stop,
    call_model,
    causal_lm_loss,
    layer_input,
    output_fisher,
    to_device,
    token_mask,
    tokens,
)

logger = logging.getLogger("mustat.layerwise")


class SkippedLayersWarning(UserWarning):
    """Weights of a kind one-shot pruning does not support stay dense: the model's sparsity is
    lower than the one asked for."""


def estimate(steps: list[list[Target]], tokens: int, *, method: str, update: bool, diagonal: bool,
             block_cache: bool) -> Cost:
    """The :class:`~mustat.cost.Cost` of pruning ``steps`` (the groups of layers measured in one pass
    each) from ``tokens`` calibration tokens: the statistics held at once (float64 Grams, or their
    diagonals), the widest layer's factorisation, the cached block inputs, and the floating-point
    work in seconds at this machine's measured float32 matrix-product rate (an estimate: the
    model's other operations and Python add to it)."""
    sandwich = method == "mu-sandwich"
    solves = update or method not in ("magnitude", "wanda")
    statistics, widest, cache = 0, 0, 0
    work = {"statistics": 0.0, "products": 0.0, "solves": 0.0}
    for step in steps:
        inputs = {}
        for t in step:
            for rows, _ in t.parts:
                W = t.matrix()[rows]
                r, d = W.shape
                key = (id(t.caller), d) if t.kind in ("linear", "conv1d") and not sandwich else (t.name, rows.start)
                inputs[key] = d
                work["products"] += 2.0 * tokens * r * d                      # the layer's own product
                if solves:
                    work["solves"] += 4 / 3 * d ** 3 + 2.0 * r * d * d         # factorisation, sweep
                    widest = max(widest, d)
        held = sum(d if diagonal else d * d * (1 + sandwich) for d in inputs.values())
        statistics = max(statistics, 8 * held)
        work["statistics"] += sum(2.0 * tokens * (1 if diagonal else d) * d for d in inputs.values())
        if block_cache:
            cache = max(cache, 2 * 4 * tokens * max(inputs.values()))      # a block's inputs and outputs
    rate = machine_flops(torch.float32)
    memory = (("statistics", statistics), ("factorisation", 2 * 8 * widest * widest), ("cached inputs", cache))
    flops = sum(work.values())
    return Cost(bytes=sum(b for _, b in memory), seconds=flops / rate, flops=flops,
                parts=tuple((k, v / rate) for k, v in work.items()), memory=memory,
                note="method='wanda' holds d numbers per layer, not d^2" if not diagonal else "")


@dataclass
class OneShotReport:
    """What :func:`oneshot` did: one row per pruned tensor (``layers``), the model's counts
    (``pruning``), the tensors left out and why, the passes over the calibration batches (of the
    whole model or of one block) and the wall time."""

    layers: pd.DataFrame
    pruning: PruningReport
    skipped: list[tuple[str, str]] = field(default_factory=list)
    passes: int = 0
    seconds: float = 0.0
    driver: str = "model"
    estimate: Cost | None = None

    def __str__(self) -> str:
        err = self.layers["error"].mean() if len(self.layers) else float("nan")
        left = f"; {len(self.skipped)} tensors left as they were (see .skipped)" if self.skipped else ""
        return (f"{len(self.layers)} layers pruned one-shot to {self.pruning.sparsity:.1%} in {self.seconds:.1f} s "
                f"({self.passes} passes, per {self.driver}); mean relative reconstruction error {err:.4f}{left}")


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


def _hidden_in(args: tuple, kwargs: dict) -> Tensor | None:
    x = args[0] if args else kwargs.get("hidden_states")
    return x if isinstance(x, Tensor) else None


def _hidden_out(out) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    try:
        first = out[0]
    except (TypeError, IndexError, KeyError):
        return None
    return first if isinstance(first, Tensor) else None


def _with_hidden(args: tuple, kwargs: dict, x: Tensor) -> tuple[tuple, dict]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def _same(a, b) -> bool:
    """Whether an argument of one block's call can stand for another's (replayed unchanged)."""
    if a is b or (a is None and b is None):
        return True
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (bool, int, float, str)) and type(a) is type(b):
        return a == b
    return False


def _block_list(model: nn.Module, targets: list[Target]) -> tuple[list[nn.Module], dict[str, int]] | None:
    """The ``ModuleList`` whose blocks hold every target, and each target's block; None if none."""
    for ml in model.modules():
        if not isinstance(ml, nn.ModuleList) or len(ml) < 2:
            continue
        owner = {id(m): i for i, block in enumerate(ml) for m in block.modules()}
        where = {t.name: owner.get(id(t.module)) for t in targets}
        if all(i is not None for i in where.values()):
            return list(ml), where
    return None


@dataclass
class _Trace:
    order: list[Target]
    once: bool
    unreached: set[str]
    inputs: list[int]
    chained: bool = False
    tokens: int = 0   # the first layer's input tokens in the traced batch


def _trace(model, batch, forward, targets: list[Target], device, blocks: list[nn.Module] | None) -> _Trace:
    """Call order of the targets on one batch, whether each is called once (so passes may stop
    early), the targets never reached, an id of each one's input (negative: not shared), and
    whether ``blocks`` feed one another (each called once, in order, on the previous one's output,
    with the same other arguments).

    Little is held: only the previous target's input (inputs are shared by consecutive targets
    only) and the previous block's call, compared as the next one arrives; where the targets sit
    in ``blocks`` the pass stops after the last block, before the model's head (a causal LM's
    logits are the largest tensor of its forward)."""
    order: list[tuple[Target, int]] = []
    calls: dict[str, int] = {}
    last: list = [None, 0]                       # the previous target's input and its id
    first_tokens: list[int] = []
    state = {"next": 0, "chained": bool(blocks), "previous": None}
    handles = []
    for t in targets:
        def seen(x, t=t):
            calls[t.name] = calls.get(t.name, 0) + 1
            if calls[t.name] > 1:
                return
            if not first_tokens:
                first_tokens.append((t.tokens(x) if t.kind == "conv" else tokens(x, token_mask(batch))).shape[0])
            if t.kind not in ("linear", "conv1d"):
                order.append((t, -len(order) - 1))
                last[0] = None
                return
            if x is not last[0]:
                last[0], last[1] = x, len(order)
            order.append((t, last[1]))
        if t.kind == "mha-out":
            handles.append(t.caller.register_forward_hook(lambda m, a, o, seen=seen: seen(o)))
        else:
            handles.append(t.caller.register_forward_pre_hook(
                lambda m, a, k, t=t, seen=seen: seen(layer_input(t, a, k)), with_kwargs=True))

    def block_called(i, a, k, o):
        previous, state["previous"] = state["previous"], (a, k, _hidden_out(o))
        if i != state["next"]:
            state["chained"] = False
        state["next"] = i + 1
        if state["chained"] and previous is not None:
            a0, k0, o0 = previous
            x = _hidden_in(a, k)
            rest0, rest1 = _with_hidden(a0, k0, x), _with_hidden(a, k, x)
            state["chained"] = (x is not None and x is o0 and set(k0) == set(k)
                                and _same(rest0[0], rest1[0]) and all(_same(k0[key], rest1[1][key]) for key in k0
                                                                      if key != "hidden_states" or a0))
        if i == len(blocks) - 1 and len(calls) == len(targets):
            raise Stop                           # every target seen: the head is not needed

    for i, block in enumerate(blocks or []):
        handles.append(block.register_forward_hook(
            lambda m, a, k, o, i=i: block_called(i, a, k, o), with_kwargs=True))
    try:
        call_model(model, to_device(batch, device), forward)
    except Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    once = all(c == 1 for c in calls.values())
    chained = bool(blocks) and once and state["chained"] and state["next"] == len(blocks)
    return _Trace([t for t, _ in order], once, {t.name for t in targets} - set(calls), [i for _, i in order],
                  chained, first_tokens[0] if first_tokens else 0)


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
    W = t.matrix()
    return (W if W.dtype == torch.float64 else W.float()), t.alive()


def _errors(targets: list[Target], changes: dict[str, Tensor]
            ) -> tuple[list, dict[str, list[float]], list[Tensor | None]]:
    """Hooks adding ``||D x||^2`` and ``||W x||^2`` over the tokens each target sees, for targets
    pruned from diagonal statistics (no Gram to read the error from); the block driver runs them on
    the first calibration batch only (a product per layer costs a third of the block's work). In the true-sequential
    order a layer's inputs when its block's outputs are computed are those it was pruned from, so
    this is the error the Gram would give; with ``sequential="block"`` it is the error on the inputs
    the layer sees in the pruned block. One product per layer: the pruned layer's own output
    ``y = (W + D) x + b`` gives ``W x = y - b - D x``. Returns the hooks, the sums and a cell for
    the token mask."""
    sums: dict[str, list[float]] = {t.name: [0.0, 0.0] for t in targets}
    mask: list[Tensor | None] = [None]
    handles = []
    for t in targets:
        def post(module, args, kwargs, y, t=t, D=changes[t.name]):
            x = layer_input(t, args, kwargs)
            tok = t.tokens(x) if t.kind == "conv" else tokens(x, mask[0])
            y = y.movedim(1, -1) if t.kind == "conv" else y
            y = y.reshape(-1, y.shape[-1]) if t.kind == "conv" else tokens(y, mask[0])
            Dx = tok @ D.to(tok.dtype).T
            bias = getattr(module, "bias", None)
            Wx = y - Dx if bias is None else y - bias - Dx
            sums[t.name][0] += float(torch.dot(Dx.flatten(), Dx.flatten()))
            sums[t.name][1] += float(torch.dot(Wx.flatten(), Wx.flatten()))
        handles.append(t.caller.register_forward_hook(post, with_kwargs=True))
    return handles, sums, mask


def oneshot(
    model: nn.Module,
    calibration: Iterable | None,
    *,
    method: str = "sparsegpt",
    sparsity: float | None = None,
    pattern: str = "unstructured",
    scope: str | None = None,
    allocation: str | Mapping[str, float] = "uniform",
    update: bool | None = None,
    refit: bool = False,
    refit_tol: float = 1e-2,
    swaps: int = 0,
    damping: float = 0.01,
    sigma: str = "row",
    loss: Callable | str | None = None,
    loss_damping: float = 0.0,
    block_size: int = 128,
    layers: Iterable[str] | None = None,
    exclude: Iterable[str] = ("lm_head",),
    forward: Callable | None = None,
    driver: str = "auto",
    sequential: str = "layer",
    errors: bool = True,
    progress: bool | None = None,
    shots: int = 1,
) -> OneShotReport:
    """Prune a trained model once, layer by layer, from a few calibration batches (no training).

    Parameters
    ----------
    model
        Any module with ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d``, ``transformers``' ``Conv1D``
        (GPT-2) or ``nn.MultiheadAttention`` layers (:mod:`mustat.layers`); masks are installed and,
        with ``update``, the kept weights changed, in place. Its train/eval mode is restored.
    calibration
        Batches (a list, a DataLoader; an iterator is read into a list first), run through the model
        once per group of layers, or with the block driver once to the first block. A batch is a tensor (``model(batch)``), a tuple or list whose first element
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
    allocation
        How the sparsity is shared between layers: ``"uniform"`` (each layer at ``sparsity``),
        ``"owl"`` (OWL's outlier-weighted block sparsities with the published ``M=5``,
        ``lambda=0.08``, from the dense model's Wanda scores: :mod:`mustat.layerwise.allocation`),
        or a mapping ``{layer name: sparsity}`` (layers it leaves out get ``sparsity``).
        ``scope="global"`` is the statistical alternative: one threshold on the method's own
        statistic shares the budget exactly.
    update
        Apply OBS's compensating update to the kept weights (SparseGPT's sweep). ``None``: on for
        ``sparsegpt``, off for the others.
    refit
        After each layer's mask is chosen (by any method), refit its kept weights exactly: each
        row's least-squares reconstruction on its support, by preconditioned conjugate gradients
        (:func:`mustat.layerwise.solve.refit`; ALPS's second stage). Needs calibration data, and
        the whole Gram matrix for Wanda.
    refit_tol
        The refit's relative residual, in (0, 1).
    swaps
        After each layer's mask is chosen (by any method), refine it by up to
        ``swaps`` exact 1-swaps per row (:func:`mustat.layerwise.solve.swap_refine`; SparseSwaps,
        Zimmer et al. 2025): each swap prunes one kept weight and unprunes one pruned weight of
        the same row (of the same N:M group), the pair that lowers the row's reconstruction error
        ``(w' - w)^T H_d (w' - w)`` most, so every budget (row, layer, global, N:M) is kept. The
        unpruned weight takes its least-squares value given the others (with the update or the
        refit) or its original value (without either: the weights stay the dense ones). A local
        improvement: a row stops at a mask no single swap improves. With ``refit``, the swaps
        start from the refitted weights and the refit runs again after them. ``0`` (the
        default): none. Needs calibration data, and the whole Gram matrix for Wanda.
    damping
        Added to the Gram matrix's diagonal as a fraction of its mean (SparseGPT's 0.01).
    sigma
        The noise scale of ``mu`` and ``mu-sandwich``: ``row`` (each output row's mean squared
        output), ``layer`` (one for the layer), or ``loss``: the model's own loss, ``1 / B_ii``
        with ``B`` K-FAC's output factor of ``loss`` on the calibration batches, measured once on
        the dense model (:func:`mustat.statistics.output_fisher`), so that ``z^2`` is the Wald
        statistic of the loss's Kronecker-factored Fisher and rows, layers (``scope="global"``)
        compete in units of the loss; see :mod:`mustat.layerwise.solve`. That needs one backward
        pass per calibration batch, whose memory grows with the batch's tokens (SmolLM2-135M:
        6.3 GB at 8 x 256 tokens, 2.3 GB at 2 x 256, ``benchmarks/output_fisher_memory.py``):
        split the calibration into smaller batches to bound it. With ``loss="causal-lm"``,
        ``scope="global"`` and no ``forward``, the dense model's input Grams for the allocation
        are collected in the same pass instead of one of their own, and held beside it, where they
        take under a quarter of the free memory.
    loss
        For ``sigma="loss"``: ``loss(model, batch)`` returning a scalar to differentiate, or
        ``"causal-lm"`` for a ``transformers`` causal LM (next-token cross-entropy,
        :func:`mustat.statistics.causal_lm_loss`).
    loss_damping
        For ``sigma="loss"``: added to each layer's ``B_ii`` as a fraction of their mean (K-FAC's
        damping of its second factor, as ``damping`` is of the first). ``B`` is the loss's local
        curvature: an attention head whose softmax is saturated (an attention sink) has
        ``B_ii`` near 0 for its query rows though removing them is catastrophic, and a first shot
        drives it lower still (SmolLM2-135M, block 18: 1e-3 to 1e-5 of its dense value for a tenth
        of the query rows, whose head the second shot then cuts; REPRODUCTION section 7).
        ``0`` (the default): undamped, the statistic of the tables.
    block_size
        Columns per lazy block of the update (SparseGPT's 128); a multiple of M for N:M.
    layers
        Names of the tensors to prune (``model.named_parameters()`` names); default every
        supported one except ``exclude`` and tensors tied to an embedding.
    exclude
        Module names (full path or last component) left out by default: the language-model head.
    forward
        ``forward(model, batch)`` for models called another way.
    driver
        ``"auto"``: run the model once per block where the layers sit in a list of blocks that feed
        one another (checked on the first batch; the module notes), otherwise once per group of
        layers from the model's input; ``"model"``: always the latter. Both give the same result;
        the block driver runs each block about twice instead of the model once per group.
    sequential
        ``"layer"``: each group of layers measured on inputs that passed through the layers pruned
        before it, inside a block too (GPTQ's true-sequential order); ``"block"``: every layer of a
        block (of the model, without blocks) measured in one pass from the block's inputs before
        any of it is pruned, as SparseGPT's and Wanda's drivers do (fewer passes, the later layers'
        statistics from the dense block).
    errors
        Report each layer's relative reconstruction error ``||(W' - W) X||^2 / ||W X||^2`` on its
        calibration inputs (read from the Gram; for Wanda's diagonal statistics under the block
        driver, from one more product per layer on the first calibration batch's outputs, an
        estimate); ``False`` leaves the column NaN and saves that.
    progress
        ``None``: when the cost estimate exceeds a few seconds
        (:data:`mustat.cost.LONG_FIT_SECONDS`), print it to stderr and show a progress bar over
        the groups of layers; ``True``: always; ``False``: never (the estimate still goes to the
        ``mustat.layerwise`` logger).
    shots
        Prune in that many steps to ``sparsity`` (``sparsity * k / shots`` after step ``k``), each a
        full one-shot call with every statistic re-estimated on the model the previous step left
        (LLM Surgeon's multi-shot): the Grams, the loss's Fisher factor and, with
        ``scope="global"`` or OWL, the allocation see the already-pruned model (a mapping's
        sparsities are scaled the same way), and weights pruned in
        an earlier step stay pruned and count towards the target. Unstructured sparsity only.
        The report's ``layers`` (their errors against the weights the last step started from) are
        the last step's; its passes and seconds are the sums.

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
    if isinstance(allocation, str):
        allocation = check_option(allocation, "allocation", ALLOCATIONS)
    elif not isinstance(allocation, Mapping):
        raise TypeError(f"allocation must be one of {', '.join(ALLOCATIONS)} or a mapping of layer sparsities, got "
                        f"{type(allocation).__name__}")
    if allocation != "uniform" and (nm.structured or scope == "global"):
        raise ValueError(f"allocation={allocation if isinstance(allocation, str) else 'a mapping'!r} shares an "
                         f"unstructured sparsity between layers; it does not combine with "
                         f"{'pattern=' + repr(str(nm)) if nm.structured else 'scope=' + repr(scope)}")
    if nm.structured and scope != "row":
        raise ValueError(f"scope={scope!r} does not apply to pattern='{nm}': every group of {nm.m} keeps {nm.n}; "
                         "use scope='row'")
    check_scalar(damping, "damping", kind=Real, low=0.0, high=1e6, closed="right")
    if damping == 0:
        raise ValueError("damping must be in (0, 1e6], got 0: the Gram matrix of collinear inputs is singular")
    sigma = check_option(sigma, "sigma", S.SIGMAS)
    if isinstance(loss, str):
        check_option(loss, "loss", ("causal-lm",))
        loss = causal_lm_loss
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be a function loss(model, batch) or 'causal-lm', got {type(loss).__name__}")
    if sigma == "loss" and loss is None:
        raise ValueError("sigma='loss' needs loss=: a function loss(model, batch), or 'causal-lm' for a transformers "
                         "causal LM")
    check_scalar(loss_damping, "loss_damping", kind=Real, low=0.0, high=1e6)
    if loss_damping and sigma != "loss":
        raise ValueError(f"loss_damping={loss_damping} damps the loss's output factor: it needs sigma='loss', got "
                         f"sigma={sigma!r}")
    if sigma == "loss" and method not in ("mu", "mu-sandwich"):
        raise ValueError(f"sigma='loss' is the noise scale of mu and mu-sandwich, not of method={method!r}")
    driver = check_option(driver, "driver", ("auto", "model"))
    sequential = check_option(sequential, "sequential", ("layer", "block"))
    check_scalar(block_size, "block_size", kind=Integral, low=1)
    block_size = int(block_size)
    if update is not None and not isinstance(update, bool):
        raise TypeError(f"update must be True, False or None, got {update!r}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be a function forward(model, batch), got {type(forward).__name__}")
    if not isinstance(errors, bool):
        raise TypeError(f"errors must be True or False, got {errors!r}")
    if isinstance(layers, str):
        raise TypeError(f"layers must be a list of parameter names, got the string {layers!r}")
    if nm.structured and block_size % nm.m:
        raise ValueError(f"block_size={block_size} must be a multiple of M={nm.m} for pattern='{nm}'")
    if not isinstance(refit, bool):
        raise TypeError(f"refit must be True or False, got {refit!r}")
    check_scalar(refit_tol, "refit_tol", kind=Real, low=0.0, high=1.0, closed="neither")
    check_swaps(swaps)
    if update is None:
        update = method == "sparsegpt"
    needs_data = method != "magnitude" or update or refit or swaps > 0
    if calibration is None and needs_data:
        raise ValueError(f"calibration batches are required for method={method!r}"
                         f"{' with update' if update else ''}{' with refit' if refit else ''}"
                         f"{' with swaps' if swaps else ''}; only magnitude without update, refit or swaps needs none")
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
    check_scalar(shots, "shots", kind=Integral, low=1)
    if shots > 1:
        if nm.structured:
            raise ValueError(f"shots={shots} prunes in steps of sparsity; pattern='{nm}' fixes every group at once: "
                             "use shots=1")
        options = dict(method=method, pattern=pattern, scope=scope, update=update, refit=refit,
                       refit_tol=refit_tol, swaps=swaps, damping=damping, sigma=sigma, loss=loss,
                       loss_damping=loss_damping,
                       block_size=block_size, layers=None if layers is None else list(layers),
                       exclude=tuple(exclude), forward=forward, driver=driver, sequential=sequential, errors=errors,
                       progress=progress)
        steps = []
        for k in range(1, int(shots) + 1):
            share = k / int(shots)                      # the last step at the target itself, not a rounding of it
            steps.append(oneshot(model, calibration, sparsity=sparsity if k == int(shots) else sparsity * share,
                                 allocation=allocation if isinstance(allocation, str) else
                                 {n: v if k == int(shots) else v * share for n, v in allocation.items()},
                                 **options))
        last = steps[-1]
        return OneShotReport(last.layers, last.pruning, last.skipped, sum(r.passes for r in steps),
                             sum(r.seconds for r in steps), last.driver, last.estimate)
    table = entries(model)
    targets, skipped = find_targets(model, table, None if layers is None else list(layers), tuple(exclude))
    if not targets:
        raise ValueError("the model has no layer one-shot pruning supports (nn.Linear, transformers' Conv1D, "
                         "nn.MultiheadAttention)")
    if isinstance(allocation, Mapping):
        names = {t.name for t in targets}
        unknown = [k for k in allocation if k not in names]
        if unknown:
            raise ValueError(f"allocation names {unknown}, which are not layers being pruned; they are: "
                             f"{', '.join(sorted(names)[:8])}{' ...' if len(names) > 8 else ''}")
        for k, v in allocation.items():
            check_scalar(v, f"allocation[{k!r}]", kind=Real, low=0.0, high=1.0, closed="left")
    for t in targets:
        for rows, _ in t.parts:
            check_groups(t.entry.source()[0].shape if t.kind == "conv" else t.matrix()[rows].shape, nm, t.name)
    device = next(model.parameters()).device
    diagonal = method == "wanda" and not update and not refit and not swaps   # Wanda reads diag H only (its scaler_row)
    start = time.perf_counter()
    rows_out, passes = [], 0
    # only when every supported layer is pruned: a user who named the layers chose the rest
    unsupported = [(n, why) for n, why in skipped if "not supported" in why] if layers is None else []
    if unsupported:
        dense = sum(table[n].source()[0].numel() for n, _ in unsupported)
        pruned = sum(t.matrix().numel() for t in targets)
        warnings.warn(f"{len(unsupported)} weight tensors are of kinds one-shot pruning does not support and stay "
                      f"as they are ({', '.join(n for n, _ in unsupported[:6])}{' ...' if len(unsupported) > 6 else ''}:"
                      f" {dense:,} weights); with the {pruned:,} weights it prunes they will be about "
                      f"{sparsity * pruned / (pruned + dense):.1%} sparse in all, not {sparsity:.1%}", SkippedLayersWarning, stacklevel=2)
    with _inference(model):
        blocks = None
        if needs_data:
            found = _block_list(model, targets) if driver == "auto" else None
            trace = _trace(model, first, forward, targets, device, found[0] if found else None)
            passes += 1
            skipped += [(t.name, "not reached by the calibration forward") for t in targets if t.name in trace.unreached]
            groups = _groups(trace.order, trace.inputs, trace.once)
            if found and trace.chained and driver == "auto":
                blocks = found
        else:
            groups = [[t] for t in targets]
        if not groups:
            raise ValueError("no layer was reached by the calibration forward; check forward= and the batches")
        flat = [t for g in groups for t in g]
        shares = {t.name: sparsity for t in flat}
        fisher, dense = None, None
        if sigma == "loss":
            # the global allocation's Grams of the dense model come with the loss's pass (one forward fewer)
            # where that pass calls the model as the statistics' own would (the built-in causal-LM loss, no
            # forward=), and the Grams fit beside its autograd graph (float64 d x d each, twice for the sandwich)
            held = sum(t.matrix().shape[1] ** 2 for t in flat) * 8 * (2 if method == "mu-sandwich" else 1)
            if (scope == "global" and loss is causal_lm_loss and forward is None
                    and held < 0.25 * psutil.virtual_memory().available):
                dense = Collector(flat, method == "mu-sandwich", device)
            with torch.enable_grad():
                fisher = output_fisher(model, calibration, flat, loss, dense)
            if loss_damping:
                fisher = {n: B + loss_damping * B.mean() for n, B in fisher.items()}
            passes += len(calibration) if hasattr(calibration, "__len__") else 1
        if isinstance(allocation, Mapping):
            shares.update({k: float(v) for k, v in allocation.items()})
        elif allocation == "owl":
            shares = _owl_shares(model, calibration, forward, groups, sparsity, device)
            passes += 1
        if scope == "global":
            shares = _global_shares(model, calibration, forward, groups, method, sparsity, damping, sigma, device,
                                    fisher, None if dense is None else dense.grams)
            passes += int(method != "magnitude" and dense is None)
            dense = None                            # the Grams are scored and dropped: free their collector
            scope = "layer"
        cost = None
        if needs_data:
            if blocks is not None and sequential == "block":
                steps = [[t for t in flat if blocks[1][t.name] == k] for k in range(len(blocks[0]))]
            else:
                steps = [flat] if sequential == "block" else groups
            batches = len(calibration) if hasattr(calibration, "__len__") else 1
            cost = estimate([s for s in steps if s], trace.tokens * batches, method=method,
                            update=update or refit or swaps > 0,
                            diagonal=diagonal and blocks is not None, block_cache=blocks is not None)
            free = psutil.virtual_memory().available
            if cost.bytes > 0.9 * free:
                raise MemoryError(f"one-shot {method} needs {cost}, but {free / 2**30:.1f} GiB are free; use "
                                  "method='wanda' (the diagonal of each Gram: d numbers, not d^2), fewer calibration "
                                  "batches, or leave the widest layers out (layers=[...])")
            progress = announce(f"one-shot {method}: {len(flat)} layers from {trace.tokens * batches:,} calibration "
                                "tokens; this will take", cost, progress, logger)
        bar = tqdm(total=len(flat), desc=f"one-shot {method}", disable=not progress, unit="layer")
        knobs = dict(method=method, pattern=nm, scope=scope, update=update, damping=damping, sigma=sigma,
                     block_size=block_size, refit_tol=refit_tol if refit else None, swaps=swaps)

        def prune_group(group: list[Target], grams: dict | None, share: float) -> dict[str, Tensor]:
            changes = {}
            for t in group:
                tic = time.perf_counter()
                W, alive = _matrix(t)
                row, W_new = _prune(t, W, alive, grams, shares[t.name], knobs, errors,
                                    None if fisher is None else fisher[t.name])
                if errors and grams is not None and grams[(t.name, 0)].diagonal:
                    changes[t.name] = W_new - W
                dest = t.entry.leaf if t.entry.leaf is not None else getattr(t.module, t.attr)
                with torch.no_grad():
                    dest.copy_(t.to_stored(W_new).to(dest.dtype))
                install_mask(model, t.name, t.to_stored(row.pop("keep")), table)
                row["seconds"] = time.perf_counter() - tic + share / len(group)
                rows_out.append(row)
                bar.update()
            return changes

        if blocks is not None:
            passes += _by_block(model, calibration, forward, device, blocks, groups, trace.once, method, diagonal,
                                prune_group, rows_out, sequential)
        else:
            steps = [groups] if sequential == "block" else [[g] for g in groups]
            for step in steps:
                grams, tic = None, time.perf_counter()
                if needs_data:
                    run = Collector([t for g in step for t in g], method == "mu-sandwich", device)
                    run.run([Call(lambda b=b: call_model(model, to_device(b, device), forward), token_mask(b))
                             for b in calibration], halt=trace.once)
                    passes += 1
                    grams = run.grams
                for group in step:
                    prune_group(group, grams, (time.perf_counter() - tic) / len(step))
        bar.close()
    return OneShotReport(pd.DataFrame(rows_out), PruningReport.from_model(model, [t.name for t in flat]),
                         skipped, passes, time.perf_counter() - start, "block" if blocks is not None else "model",
                         cost)


def check_swaps(swaps: object) -> int:
    """``swaps``: a whole number of swaps per row, 0 or more (0: none)."""
    if isinstance(swaps, bool) or not isinstance(swaps, Integral):
        raise TypeError(f"swaps must be a whole number of 1-swaps per row (0: none), got {swaps!r} "
                        f"({type(swaps).__name__})")
    if swaps < 0:
        raise ValueError(f"swaps must be 0 (no refinement) or a positive number of 1-swaps per row, got {swaps!r}")
    return int(swaps)


def _prune(t: Target, W: Tensor, alive: Tensor, grams: dict | None, sparsity: float, knobs: dict,
           errors: bool = True, fisher: Tensor | None = None) -> tuple[dict, Tensor]:
    """One target pruned from its statistics: its report row (with its keep-mask) and new weights."""
    W_new, keep = torch.empty_like(W), torch.empty_like(alive)
    error_num = error_den = 0.0
    for i, (rows, _) in enumerate(t.parts):
        g = grams.get((t.name, i)) if grams is not None else None
        W_new[rows], keep[rows] = S.solve(W[rows], g, sparsity=sparsity, alive=alive[rows],
                                          fisher=None if fisher is None else fisher[rows], **knobs)
        if errors and g is not None and not g.diagonal:
            # in the weights' precision: quadratic forms of a PSD matrix, no cancellation to fear
            D, W0 = W_new[rows] - W[rows], W[rows]
            H = g.H.to(W0.dtype)
            error_num += float(((D @ H) * D).sum(dtype=torch.float64))
            error_den += float(((W0 @ H) * W0).sum(dtype=torch.float64))
    row = dict(name=t.name, kind=t.kind, rows=W.shape[0], inputs=W.shape[1], sparsity=float(1 - keep.float().mean()),
               error=error_num / error_den if error_den > 0 else float("nan"), keep=keep)
    return row, W_new


def _by_block(model, calibration, forward, device, found, groups, once, method, diagonal, prune_group,
              rows_out, sequential) -> int:
    """The block-by-block driver (module notes); returns the passes made."""
    blocks, where = found
    calls: list[tuple[tuple, dict, Tensor | None]] = []

    def capture(module, args, kwargs):
        calls.append((args, kwargs, mask[0]))
        raise Stop

    mask: list[Tensor | None] = [None]
    handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for b in calibration:
            mask[0] = token_mask(b)
            try:
                call_model(model, to_device(b, device), forward)
            except Stop:
                pass
    finally:
        handle.remove()
    passes = 1
    for k, block in enumerate(blocks):
        mine = [g for g in groups if where[g[0].name] == k]
        changes: dict[str, Tensor] = {}
        for step in ([mine] if sequential == "block" else [[g] for g in mine]):
            tic = time.perf_counter()
            run = Collector([t for g in step for t in g], method == "mu-sandwich", device, diagonal)
            run.run([Call(lambda a=a, kw=kw, block=block: block(*a, **kw), m) for a, kw, m in calls], halt=once)
            passes += 1
            for group in step:
                changes.update(prune_group(group, run.grams, (time.perf_counter() - tic) / len(step)))
        if k == len(blocks) - 1 and not changes:
            break
        targets = [t for g in mine for t in g if t.name in changes]
        handles, sums, error_mask = _errors(targets, changes)
        try:
            new_calls = []
            for j, (a, kw, m) in enumerate(calls):
                error_mask[0] = m
                out = _hidden_out(block(*a, **kw))
                new_calls.append((*_with_hidden(a, kw, out), m))
                if j == 0:          # the first batch's tokens estimate the error: one product, not one per batch
                    for h in handles:
                        h.remove()
        finally:
            for h in handles:
                h.remove()
        calls = new_calls
        passes += 1
        for r in rows_out:
            if r["name"] in sums:
                num, den = sums[r["name"]]
                r["error"] = num / den if den > 0 else float("nan")
    return passes


def _owl_shares(model, calibration, forward, groups, sparsity, device) -> dict[str, float]:
    """OWL's layer sparsities from the dense model's Wanda scores, blocks as the block driver finds them."""
    flat = [t for g in groups for t in g]
    run = Collector(flat, False, device, diagonal=True)
    run.run([Call(lambda b=b: call_model(model, to_device(b, device), forward), token_mask(b)) for b in calibration],
            halt=False)
    scores = {}
    for t in flat:
        W, alive = _matrix(t)
        scores[t.name] = torch.cat([S.scores("wanda", W[rows] * alive[rows], run.grams[(t.name, i)], 0.0).flatten()
                                    for i, (rows, _) in enumerate(t.parts)])
    found = _block_list(model, flat)
    return owl_shares(scores, found[1] if found else None, sparsity)


def _global_shares(model, calibration, forward, groups, method, sparsity, damping, sigma, device,
                   fisher=None, grams=None) -> dict[str, float]:
    """Each layer's sparsity when the method's scores of the dense model compete across layers.

    The scores are taken per token (the Gram matrix's mean, ``H / n``): ``z^2 / n`` for ``mu``,
    the mean error per token for ``sparsegpt``, ``|w| * rms(x_j)`` for ``wanda``; so a layer that
    sees each token T times (a token layer beside a pooled one) competes as if it saw it once."""
    flat = [t for g in groups for t in g]
    if grams is None and method == "magnitude":
        grams = {}
    elif grams is None:
        run = Collector(flat, method == "mu-sandwich", device, diagonal=method == "wanda")
        run.run([Call(lambda b=b: call_model(model, to_device(b, device), forward), token_mask(b)) for b in calibration],
                halt=False)
        grams = run.grams
    # one preallocated vector of every score (8 bytes a weight), each layer's statistics dropped once
    # scored, and the cut by selection (kthvalue: a copy and its indices, 16 bytes a weight more)
    # instead of per-layer parts, their concatenation and a sort (SmolLM2's global peak 6.2 -> 4.4 GB)
    total = 0
    for t in flat:                                  # sizes from the shapes alone: no cast, no mask
        n_rows, n_cols = t.matrix().shape
        total += sum(len(range(n_rows)[rows]) * n_cols for rows, _ in t.parts)
    flat_s = torch.empty(total, dtype=torch.float64)
    start, dead, spans = 0, 0, []
    for t in flat:
        W, alive = _matrix(t)
        for i, (rows, _) in enumerate(t.parts):
            g = grams.pop((t.name, i), None)
            s = S.scores(method, W[rows] * alive[rows], g, damping, sigma,
                         None if fisher is None else fisher[t.name][rows])
            if g is not None:
                s = s / (g.n ** 0.5 if method == "wanda" else g.n)
            a = alive[rows]
            dead += int((~a).sum())
            flat_s[start:start + s.numel()] = s.masked_fill(~a, float("-inf")).flatten()
            spans.append((t.name, start, start + s.numel()))
            start += s.numel()
    pruned = S._lowest(flat_s, max(round(sparsity * total), dead))
    del flat_s
    counts: dict[str, list[int]] = {}
    for name, a, b in spans:
        c = counts.setdefault(name, [0, 0])
        c[0] += int(pruned[a:b].sum())
        c[1] += b - a
    return {name: p / n for name, (p, n) in counts.items()}
