"""The marginal estimators on logistic GLMs with known truth: each of ``--datasets`` simulated
datasets is fitted exactly (numpy Newton, no penalty), and every marginal estimator's SE
(observed and sandwich) is compared with statsmodels' Wald SE on the same fit
(``hessian_se``, equal to statsmodels to 1e-10 in tests/test_validation_references.py), and
its 95% intervals with the truth. Writes ``summary.md`` here (about a minute on 2 cores).

    python docs/calibration/marginal/run.py          # 1000 datasets, n = 500, six features
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from statsmodels.stats.proportion import proportion_confint

from mustat._io import atomic_write
from mustat.models import GLM
from mustat.uncertainty import FitContext, hessian_se, make_estimator
from validation.glm import fit_glm

HERE = Path(__file__).parent
COEF = np.array([1.0, -0.5, 0.25, 0.0, 0.0, 0.0])
ESTIMATORS = {"fisher": {}, "kfac": {}, "ekfac": {}, "block": dict(samples=10**9, block_size=None)}


def dataset(seed: int, n: int, corr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Equicorrelated Gaussian features by a Cholesky factor (portable: no SVD), Bernoulli labels."""
    rng = np.random.default_rng(seed)
    d = len(COEF)
    L = np.linalg.cholesky(np.full((d, d), corr) + (1 - corr) * np.eye(d))
    X = rng.standard_normal((n, d)) @ L.T
    y = rng.binomial(1, 1 / (1 + np.exp(-(X @ COEF))))
    return torch.tensor(X), torch.tensor(y, dtype=torch.float64)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", type=int, default=1000)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--corr", type=float, default=0.5)
    ap.add_argument("--out", default=str(HERE))
    args = ap.parse_args(argv)
    rows = []
    for seed in range(args.datasets):
        X, y = dataset(seed, args.n, args.corr)
        model = fit_glm(GLM(len(COEF), "logistic"), X, y)
        w = model.linear.weight.detach().numpy().ravel()
        ctx = FitContext(X=X, y=y, loss=lambda o, t, m=model: m.nll(o, t) / len(t))
        for kind in ("observed", "sandwich"):
            ref = hessian_se(model, lambda o, t, m=model: m.nll(o, t), (X, y), kind=kind)["linear.weight"]
            out = {"wald": ref.numpy().ravel()}
            for name, opts in ESTIMATORS.items():
                out[name] = make_estimator(name, model, kind=kind, **opts).fit(ctx).se()["linear.weight"].numpy().ravel()
            for name, se in out.items():
                for j in range(len(COEF)):
                    rows.append(dict(dataset=seed, estimator=name, kind=kind, coef=j, weight=w[j], se=se[j],
                                     wald_se=out["wald"][j], covered=abs(w[j] - COEF[j]) <= 1.959964 * se[j]))
    df = pd.DataFrame(rows)
    out = Path(args.out)
    lines = [f"# Marginal estimators on logistic GLMs ({args.datasets} datasets, n = {args.n}, six features, "
             f"equicorrelation {args.corr}, no penalty)", "",
             "`ratio`: SE / the exact Wald SE of the same kind on the same fit (median and range over all "
             "weights). `coverage`: the truth inside the 95% interval, with its Wilson 95% interval, over "
             f"{args.datasets * len(COEF)} intervals; `paired`: intervals where the estimator and exact Wald "
             "disagree about covering.", "",
             "| estimator | kind | ratio median | ratio range | coverage | Wilson 95% | paired disagreements |",
             "|---|---|---|---|---|---|---|"]
    for (name, kind), g in df.groupby(["estimator", "kind"], sort=False):
        r = g.se / g.wald_se
        k, m = int(g.covered.sum()), len(g)
        lo, hi = proportion_confint(k, m, method="wilson")
        ref = df[(df.estimator == "wald") & (df.kind == kind)].covered.to_numpy()
        lines.append(f"| {name} | {kind} | {r.median():.4f} | [{r.min():.4f}, {r.max():.4f}] | {k / m:.4f} | "
                     f"[{lo:.4f}, {hi:.4f}] | {int((g.covered.to_numpy() != ref).sum())} |")
    atomic_write(out / "summary.md", lambda t: Path(t).write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
