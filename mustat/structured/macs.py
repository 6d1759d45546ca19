"""Multiply-accumulate counts: Torch-Pruning's counter (:func:`count`) and, for a search over many
candidate cuts, the same count computed from the layer shapes alone (:class:`MacModel`), with no
copy of the model per candidate.

Torch-Pruning's counter charges a Conv ``S (K c_in c_out / groups + b c_out)`` (``S`` output
positions, ``K`` kernel taps, ``b`` 1 with a bias), a Linear ``r c_in c_out + b c_out`` (``r``
rows), and BatchNorm, activations and pooling a fixed amount per element. Removing channels only
changes the ``c`` of the layers a dependency group touches, so the count after a cut is these
formulas with the narrower widths: one traced forward pass and Torch-Pruning's per-layer count of
the dense model give everything needed. This module imports nothing from the rest of
:mod:`mustat.structured`: the groups and the surgery both use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch_pruning as tp
from torch import nn

from mustat._functional import eval_mode

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def count(model: nn.Module, example_inputs) -> tuple[int, int]:
    """``(MACs, parameters)`` of one forward pass on ``example_inputs`` (Torch-Pruning's counter:
    Linear, Conv, normalisation and pooling layers); the model's mode is restored."""
    with eval_mode(model):
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


@contextlib.contextmanager
def record_outputs(model: nn.Module):
    """While open, every forward call of a leaf module of ``model`` records, under its name, the
    ``grad_fn`` of its output and the shapes of its first input and its output: wrap the trace of
    Torch-Pruning's dependency graph in it, so that :class:`MacModel` can match the graph's
    parameter-free operations (ReLU, pooling) to the modules the counter charges."""
    seen: dict[str, tuple] = {}
    handles = []

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0] if isinstance(inputs, tuple) and inputs else inputs
            seen[name] = (getattr(output, "grad_fn", None), tuple(getattr(x, "shape", ())),
                          tuple(getattr(output, "shape", ())))
        return record

    for name, m in model.named_modules():
        if not any(True for _ in m.children()):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


class Unsupported(Exception):
    """A layer whose count :class:`MacModel` cannot write as a function of its widths."""


class MacModel:
    """The MACs of ``model`` after removing channels of ``found`` groups, from the layer shapes.

    Parameters
    ----------
    model, example_inputs
        The dense model and the inputs its graph was traced on (one sample: the counter's batch).
    graph
        Its ``tp.DependencyGraph``, built inside :func:`record_outputs` (``seen``).
    found
        The groups (anything with ``tp_group`` and ``size``) a plan indexes.
    seen
        What :func:`record_outputs` recorded during the graph's trace.

    Attributes
    ----------
    dense, params
        MACs and parameters of the dense model (Torch-Pruning's counter, as :func:`count`).

    Raises
    ------
    Unsupported
        A layer the formulas do not cover (a grouped, not depthwise, convolution; a
        parameter-free layer whose channel axis is not axis 1; a Conv or Linear called twice; two counted
        modules whose outputs are one tensor): count by cutting copies instead.

    Notes
    -----
    Checked against cut copies on random plans for an MLP, LeNet-5, a 1-D CNN, a ResNet with
    BatchNorm and coupled shortcuts, the VGG-style CNN and PyTorch's MNIST example (equal to the
    MAC, tests/test_structured_round_to.py). A parameter-free layer is matched to the graph's operation by
    the ``grad_fn`` of its output; a module the trace never reaches is charged its dense count.
    """

    def __init__(self, model: nn.Module, example_inputs, graph: tp.DependencyGraph, found: Sequence, seen: dict):
        with eval_mode(model):
            total, params, per_layer, _ = tp.utils.count_ops_and_params(model, example_inputs, layer_wise=True)
        self.dense, self.params = int(total), int(params)
        self._graph, self._seen = graph, seen
        self._mods = dict(model.named_modules())
        self._names = {m: n for n, m in self._mods.items()}
        self._counted = {n: int(per_layer.get(m) or 0) for n, m in self._mods.items()}
        if sum(self._counted[n] for n, m in self._mods.items() if not any(True for _ in m.children())) != self.dense:
            raise Unsupported("the per-layer counts do not add up to the total")
        self._by_fn: dict = {}
        for name, (fn, _, _) in seen.items():
            if fn is not None:
                self._by_fn.setdefault(fn, []).append(name)
        self._layers: dict[str, dict] = {}
        self._costs = [self._group_costs(g.tp_group, g.size) for g in found]

    def _group_costs(self, tp_group, size: int) -> dict[tuple[str, str], np.ndarray]:
        """Per counted layer and side (``"in"``, ``"out"``): the features each of the group's
        ``size`` channels takes from it."""
        per: dict[tuple[str, str], np.ndarray] = {}
        done: dict[tuple[str, str], set] = {}
        for item in tp_group.items:
            target = item.dep.target.module
            name = self._names.get(target)
            if name is None:                      # an op of the trace: the module whose output it made
                owners = [n for n in self._by_fn.get(getattr(item.dep.target, "grad_fn", None), [])
                          if self._counted[n]]
                if len(owners) > 1:
                    raise Unsupported(f"modules {owners} made the same output")
                if not owners:
                    continue                     # uncounted: a reshape, a functional ReLU, an identity
                name = owners[0]
            if item.root_idxs is None or any(r is None for r in item.root_idxs):
                raise Unsupported(f"an item of the group rooted at {tp_group[0].dep.target} has no root index")
            if name not in self._layers:
                self._layers[name] = self._layer(name, self._mods[name], self._counted[name], self._seen.get(name))
            side = "out" if self._graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
            seen_idx = done.setdefault((name, side), set())
            cost = per.setdefault((name, side), np.zeros(size))
            for idx, root in zip(item.idxs, item.root_idxs):
                if idx not in seen_idx:
                    seen_idx.add(idx)
                    cost[root] += 1
        return per

    def channel_cost(self, tp_group) -> int:
        """MACs saved by removing channel 0 of ``tp_group`` (a group of this model's ``graph``)
        from the dense model: what :func:`~mustat.structured.groups.channel_cost` measures on a copy."""
        return self.dense - self._total([self._group_costs(tp_group, len(tp_group[0].idxs))], [(0, 0)])

    @staticmethod
    def _layer(name: str, module: nn.Module, macs: int, shapes) -> dict:
        if shapes is None:
            raise Unsupported(f"layer {name!r} did not run in the trace")
        _, shape_in, shape_out = shapes
        bias = int(getattr(module, "bias", None) is not None)
        if isinstance(module, _CONV):
            positions = int(np.prod(shape_out)) // module.out_channels
            taps = int(np.prod(module.kernel_size))
            g = module.groups
            if g == 1:
                kind = "dense"
            elif g == module.in_channels == module.out_channels:
                kind = "depthwise"
            else:
                raise Unsupported(f"grouped convolution {name!r}")
            spec = dict(op="conv", kind=kind, s=positions, k=taps, b=bias, cin=module.in_channels,
                        cout=module.out_channels, groups=g)
        elif isinstance(module, nn.Linear):
            rows = int(np.prod(shape_in)) // module.in_features
            spec = dict(op="linear", s=rows, b=bias, cin=module.in_features, cout=module.out_features)
        else:
            if len(shape_in) < 2 or macs % shape_in[1]:
                raise Unsupported(f"layer {name!r}: its count is not a multiple of its axis-1 width")
            spec = dict(op="elementwise", per=macs // shape_in[1], c=shape_in[1])
        if MacModel._macs(spec, 0, 0) != macs:
            raise Unsupported(f"layer {name!r}: the formula gives {MacModel._macs(spec, 0, 0)}, the counter {macs}")
        return spec

    @staticmethod
    def _macs(spec: dict, cut_in: float, cut_out: float) -> int:
        if spec["op"] == "conv":
            if spec["kind"] == "depthwise":
                c = spec["cout"] - max(cut_in, cut_out)
                return int(spec["s"] * c * (spec["k"] + spec["b"]))
            cin, cout = spec["cin"] - cut_in, spec["cout"] - cut_out
            return int(spec["s"] * (spec["k"] * cin * cout + spec["b"] * cout))
        if spec["op"] == "linear":
            cin, cout = spec["cin"] - cut_in, spec["cout"] - cut_out
            return int(spec["s"] * cin * cout + spec["b"] * cout)
        return int(spec["per"] * (spec["c"] - max(cut_in, cut_out)))

    def after(self, plan: Sequence[tuple[int, int]]) -> int:
        """MACs after removing ``plan``'s ``(group index, channel)`` pairs."""
        return self._total(self._costs, plan)

    def _total(self, costs, plan) -> int:
        cut: dict[tuple[str, str], float] = {}
        for gi, c in plan:
            for key, cost in costs[gi].items():
                cut[key] = cut.get(key, 0.0) + cost[c]
        total = self.dense
        for name in {key[0] for key in cut}:
            spec = self._layers[name]
            total += self._macs(spec, cut.get((name, "in"), 0.0), cut.get((name, "out"), 0.0)) - self._counted[name]
        return int(total)
