"""The marginal benchmark's table in docs/REPRODUCTION.md section 3: each criterion's difference
from magnitude at 98% sparsity in accuracy points (mean over seeds), with the paired-t p-value,
from docs/pruning/marginal/summary.csv; bold where p < 0.05 and the difference is positive. The
unpenalised digits rows are the damped variants (marginal-nodecay.toml).

    .venv/bin/python docs/pruning/marginal_table.py
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

HERE = Path(__file__).parent
LABELS = ("lamp", "mu[kfac]", "mu[woodfisher]", "obs[kfac]", "obs[woodfisher]")
ORDER = [("mnist5k", "mlp"), ("mnist5k", "lenet5"), ("mnist1d", "mlp"), ("mnist1d", "cnn1d"), ("digits", "mlp")]


def _cell(r: pd.Series) -> str:
    d, p = 100 * r.diff_vs_magnitude, r.paired_t_p
    if pd.isna(p):                                   # one seed: no paired test
        return "–"
    sign = "+" if d > -0.05 else "−"
    text = f"{sign}{abs(d):.1f} ({'<0.001' if p < 0.001 else f'{p:.2g}'})"
    return f"**{text}**" if p < 0.05 and d > 0 else text


def table(summary: pd.DataFrame) -> list[str]:
    s = summary[(summary.target_sparsity.round(4) == 0.98) & (summary.metric == "test_accuracy")]
    out = ["| setting | " + " | ".join(LABELS) + " | seeds |", "| --- |" + " --- |" * (len(LABELS) + 1)]
    for (dataset, model) in ORDER:
        g = s[(s.dataset == dataset) & (s.model == model)]
        for (scope, wd), h in g.groupby(["scope", "weight_decay"], sort=True):
            # without weight decay the estimators ran with damping 1e-4 (marginal-nodecay.toml)
            rows = {lab: h[h.label.isin([lab, lab.replace("]", "-damped]")])] for lab in LABELS}
            cells = [_cell(rows[lab].iloc[0]) if len(rows[lab]) else "" for lab in LABELS]
            n = int(h.n_seeds.min())
            decay = f"{wd:.0e}" if wd else "0 (damping 1e-4)"
            out.append(f"| {dataset}, {model}, {scope}, {decay} | " + " | ".join(cells) + f" | {n} |")
    return [line.replace("e-0", "e-") for line in out]


if __name__ == "__main__":
    print("\n".join(table(pd.read_csv(HERE / "marginal" / "summary.csv"))))
