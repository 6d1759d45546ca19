import numpy as np
import pytest
import scipy.stats as sps
import torch
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from mustat.uncertainty import FitContext, make_estimator
from validation.designs import get_design
from validation.fdr import outcome, replicate, summary, unstack
from validation.invariant import StackedMLP


def _stack(R=3):
    design = get_design("teacher-sparse")
    return design, StackedMLP([design.model(r) for r in range(R)])


def test_the_sparse_teacher_reads_none_of_its_null_inputs():
    design = get_design("teacher-sparse")
    t = design.teacher()
    assert (t[0].weight[:, 6:] == 0).all() and (t[0].weight[:, :6] != 0).all()
    X, y, _ = design.sample(0)
    X2 = X.copy()
    X2[:, 6:] = np.random.default_rng(1).standard_normal((len(X), 4))
    with torch.no_grad():
        torch.testing.assert_close(t(torch.tensor(X)), t(torch.tensor(X2)))


def test_unstack_and_replicate_give_each_students_own_network():
    _, stack = _stack()
    x = torch.randn(5, 3, 10)
    out = stack(x)
    values = {"first.weight": stack.first.weight.detach(), "second.weight": stack.second.weight.detach()}
    for r in range(3):
        net = unstack(stack, r)
        torch.testing.assert_close(net(x[:, r])[:, 0], out[:, r])
        mine = replicate(stack, values, r)
        torch.testing.assert_close(mine["0.weight"], net[0].weight.detach())
        torch.testing.assert_close(mine["2.weight"], net[2].weight.detach())


def test_curvature_on_the_stack_equals_curvature_on_each_student():
    design, stack = _stack(2)
    X64 = torch.tensor(np.stack([design.sample(r)[0][:200] for r in range(2)]))
    y64 = torch.tensor(np.stack([design.sample(r)[1][:200] for r in range(2)]))
    X, y = X64.transpose(0, 1).float(), y64.T.float()
    est = make_estimator("curvature", stack).fit(FitContext(X=X, y=y, loss=design.stacked_loss(), weight_decay=1e-3))
    for r in range(2):
        single = make_estimator("curvature", unstack(stack, r)).fit(
            FitContext(X=X[:, r], y=y[:, r], loss=design.loss(), weight_decay=1e-3))
        mine = replicate(stack, est.se(), r)
        for name in ("0.weight", "2.weight"):
            torch.testing.assert_close(mine[name], single.se()[name], rtol=1e-5, atol=0)


def test_outcome_counts_benjamini_hochberg_as_statsmodels_does():
    _, stack = _stack(1)
    net = unstack(stack, 0)
    g = torch.Generator().manual_seed(0)
    est = {"0.weight": torch.randn(8, 10, generator=g), "2.weight": 3 * torch.randn(1, 8, generator=g)}
    se = {"0.weight": torch.full((8, 10), 0.5), "2.weight": torch.full((1, 8), 0.5)}
    null = {"0.weight": torch.zeros(8, 10, dtype=torch.bool), "2.weight": torch.zeros(1, 8, dtype=torch.bool)}
    null["0.weight"][:, 6:] = True
    got = outcome(net, est, se, null, dof=7.0)
    z = torch.cat([est[n].flatten() / se[n].flatten() for n in est]).numpy()
    p = 2 * sps.t.sf(np.abs(z), 7.0)
    keep = multipletests(p, alpha=0.05, method="fdr_bh")[0]
    is_null = torch.cat([null[n].flatten() for n in est]).numpy()
    assert got["discoveries"] == keep.sum() and 0 < got["discoveries"] < 88
    assert got["false"] == (keep & is_null).sum() and got["true"] == (keep & ~is_null).sum()
    assert got["nulls"] == 32 and got["nonnull"] == 56
    assert mask_untouched(net)


def mask_untouched(net):
    from mustat._params import mask_of

    return mask_of(net, "0.weight") is None      # outcome prunes a copy, never the caller's network


def test_summary_fdr_and_wilson():
    outs = [dict(discoveries=10, false=1, true=9, nonnull=20, nulls=5), dict(discoveries=0, false=0, true=0,
            nonnull=20, nulls=5), dict(discoveries=8, false=2, true=6, nonnull=20, nulls=5)]
    s = summary(outs)
    assert s["fdr"] == pytest.approx((0.1 + 0 + 0.25) / 3)
    lo, hi = proportion_confint(3, 18, method="wilson")
    assert s["pooled"] == pytest.approx(3 / 18) and s["pooled_lo"] == pytest.approx(lo) and s["pooled_hi"] == pytest.approx(hi)
    assert s["power"] == pytest.approx(15 / 60) and s["any_false"] == pytest.approx(2 / 3)
