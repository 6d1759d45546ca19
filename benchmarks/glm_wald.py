"""The GLM Wald path (validation.glm.fit_glm to the exact optimum, then mustat.hessian_se)
against statsmodels' Logit (fit, then bse) on the same data, timed in the same run: scikit-
learn's breast_cancer, standardised, with the first 10 and 20 features (all 30 separate the
classes: fit_glm refuses them, as statsmodels does). Prints each path's best time of several
and the ratio, and the largest relative difference of the standard errors.

    .venv/bin/python benchmarks/glm_wald.py
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import statsmodels.api as sm
import torch
from sklearn.datasets import load_breast_cancer

from mustat.models import GLM
from mustat.uncertainty import hessian_se
from validation.glm import SeparationError, fit_glm


def best(fn, repeats: int, inner: int = 10) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_breast_cancer()
    X_all = (data.data - data.data.mean(0)) / data.data.std(0)
    y = data.target.astype(float)
    print(f"breast_cancer (n = {len(y)}), logistic regression, fit + standard errors, one thread, best of {args.repeats}")
    print(f"{'features':>8} {'mustat ms':>10} {'statsmodels ms':>15} {'ratio':>6} {'max rel SE diff':>16}")
    for k in (10, 20):
        X = X_all[:, :k]
        Xt, yt = torch.tensor(X), torch.tensor(y)

        def ours(k=k, Xt=Xt, yt=yt):
            model = fit_glm(GLM(k), Xt, yt)
            return hessian_se(model, model.nll, (Xt, yt))

        def theirs(X=X):
            return sm.Logit(y, sm.add_constant(X)).fit(disp=0).bse

        ours(), theirs()  # warm up
        t_ours, t_sm = best(ours, args.repeats), best(theirs, args.repeats)
        se = ours()
        mine = np.r_[se["linear.bias"].numpy(), se["linear.weight"].numpy().ravel()]
        diff = float(np.max(np.abs(mine / theirs() - 1)))
        print(f"{k:>8} {1e3 * t_ours:>10.2f} {1e3 * t_sm:>15.2f} {t_ours / t_sm:>6.2f} {diff:>16.2e}")
    try:
        fit_glm(GLM(30), torch.tensor(X_all), torch.tensor(y))
    except SeparationError as err:
        print(f"all 30 features: refused ({err})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sm.Logit(y, sm.add_constant(X_all)).fit(disp=0)
            print("statsmodels: fitted all 30 features without an error")
        except Exception as err:  # statsmodels' PerfectSeparationError
            print(f"statsmodels: {type(err).__name__}")


if __name__ == "__main__":
    main()
