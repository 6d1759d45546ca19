"""The GLM, invariant-target and FDR tables of docs/CALIBRATION.md, printed from the committed
results (docs/calibration/summary.csv: the quick study; docs/calibration/full/summary.csv: the
full one; invariant.csv, misspecified.csv and fdr.csv: docs/calibration/invariant.py, misspecified.py
and fdr.py; marginal/study/summary.csv: the marginal study), so that every
figure in them comes from a command:

    .venv/bin/python docs/calibration/tables.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).parent
#: the quick study's long window (validation.study.QUICK_SCOPED; the full study's is 600/640)
QUICK_LONG = "adam lr=0.02 S=64 replacement 300/320ep"
QUICK_ROWS = [  # (design, setting label, estimator) in the page's order
    *[(d, QUICK_LONG, e) for d in ("logistic", "linear")
      for e in ("pseudo", "calibrated", "batch-means", "curvature", "wald")],
    ("logistic", "sgd lr=0.05 S=32 replacement 45/60ep", "pseudo"),
    ("logistic", "sgd lr=0.05 S=32 replacement 45/60ep", "calibrated"),
    ("logistic", "sgd lr=0.05 S=32 replacement 45/60ep", "batch-means"),
    ("logistic", "adam lr=0.01 S=32 replacement 45/60ep", "calibrated"),
    ("logistic", "adam lr=0.01 S=32 replacement 45/60ep", "batch-means"),
    ("linear", "sgd lr=0.05 S=32 replacement 45/60ep", "calibrated"),
    ("linear", "adam lr=0.01 S=32 replacement 45/60ep", "batch-means"),
    ("logistic", "adam lr=0.01 S=32 shuffle 45/60ep", "calibrated"),
    ("logistic", "adam lr=0.01 S=32 shuffle 45/60ep", "batch-means"),
    ("logistic", "adam lr=0.01 S=32 replacement 5/60ep", "calibrated"),
    ("logistic", "adam lr=0.01 S=32 replacement 5/60ep", "batch-means"),
]


def _short(setting: str) -> str:
    parts = setting.replace(" S=32", "").replace(" replacement", "").replace("ep", " ep").split(" ")
    return ", ".join([" ".join(parts[:2])] + [p for p in parts[2:] if p != ""]).replace(", ep", " ep")


def _pm(v, lo, hi) -> str:
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def _row(s: pd.DataFrame, design: str, setting: str, estimator: str) -> pd.Series:
    hit = s[(s.design == design) & (s.setting == setting) & (s.estimator == estimator)
            & (s.reference == ("wald-sandwich" if "wd=" in setting else "wald"))]
    if len(hit) != 1:
        raise LookupError(f"{design} / {setting} / {estimator}: {len(hit)} rows in the summary")
    return hit.iloc[0]


def quick_table(summary: pd.DataFrame) -> list[str]:
    out = ["| design | setting | estimator | SE / exact (median) | coverage95 [Wilson] | type-I at 0.05 [Wilson] | "
           "KS p | t dof | window ok | McNemar p vs exact |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for design, setting, est in QUICK_ROWS:
        r = _row(summary, design, setting, est)
        dof = f"{r.interval_dof:.0f}" if np.isfinite(r.interval_dof) else ""
        ok = "" if pd.isna(r.window_ok) else f"{r.window_ok:.2f}"
        mc = "" if est == "wald" or pd.isna(r.mcnemar_pvalue) else f"{r.mcnemar_pvalue:.2g}"
        name = "wald (exact)" if est == "wald" else est
        out.append(f"| {design} | {_short(setting)} | {name} | {r.se_ratio_median:.3f} | "
                   f"{_pm(r.coverage95, r.coverage95_lo, r.coverage95_hi)} | "
                   f"{_pm(r.type1_05, r.type1_05_lo, r.type1_05_hi)} | {r.ks_null_pvalue:.3f} | {dof} | {ok} | {mc} |")
    return out


def full_table(summary: pd.DataFrame) -> list[str]:
    out = ["| design | optimizer | batch-means / exact | coverage95 [Wilson] | type-I [Wilson] | KS p | its diagnostic | "
           "McNemar p vs exact | calibrated: coverage | curvature: coverage | exact Wald: coverage |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for opt in ("adam", "sgd"):
        for design in ("logistic", "linear", "logistic-r7", "linear-r7"):
            setting = f"{opt} lr=0.02 S=32 replacement 600/640ep"
            bm = _row(summary, design, setting, "batch-means")
            cov = {e: _row(summary, design, setting, e).coverage95 for e in ("calibrated", "curvature", "wald")}
            verdict = "accepts" if bm.window_ok >= 0.5 else "rejects"
            out.append(f"| {design} | {opt} | {bm.se_ratio_median:.3f} | {_pm(bm.coverage95, bm.coverage95_lo, bm.coverage95_hi)} | "
                       f"{_pm(bm.type1_05, bm.type1_05_lo, bm.type1_05_hi)} | {bm.ks_null_pvalue:.2f} | {verdict} | "
                       f"{bm.mcnemar_pvalue:.2g} | {cov['calibrated']:.3f} | {cov['curvature']:.3f} | {cov['wald']:.3f} |")
    return out


def bootstrap_ratios(summary: pd.DataFrame) -> list[str]:
    rows = summary[(summary.estimator == "bootstrap") & (summary.reference == "wald")]
    return [f"- bootstrap / exact: {r.design}, {r.setting}: {r.se_ratio_median:.3f} (B = {r.bootstrap_B:.0f})"
            for r in rows.drop_duplicates("design").itertuples()]


def invariant_table(table: pd.DataFrame) -> list[str]:
    out = []
    for (wd, target), g in table.groupby(["weight_decay", "target"], sort=False):
        r = {row.rule.split(" (")[0]: row for row in g.itertuples()}
        bm, sd, sw = r["batch means"], r["window SD"], r["sandwich"]
        out.append(f"| {wd:g} | {target} | {_pm(bm.coverage, bm.lo, bm.hi)} | {sd.coverage:.3f} | "
                   f"{_pm(sw.coverage, sw.lo, sw.hi)} | {bm.se_ratio_median:.2f}, {sw.se_ratio_median:.2f} | "
                   f"{bm.centre_bias_median:.2f}, {sw.centre_bias_median:.2f} |")
    return out


def fdr_table(table: pd.DataFrame) -> list[str]:
    out = ["| weight decay | estimator | realised FDR [95%] | pooled false share [Wilson] | P(any false) | power |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in table.itertuples():
        out.append(f"| {r.weight_decay:g} | {r.estimator} | {_pm(r.fdr, r.fdr_lo, r.fdr_hi)} | "
                   f"{_pm(r.pooled, r.pooled_lo, r.pooled_hi)} | {r.any_false:.2f} | {r.power:.3f} |")
    return out


def misspecified_table(table: pd.DataFrame) -> list[str]:
    out = ["| design | window, lr | sandwich / observed | coverage: observed, sandwich | batch means: / observed, / sandwich, "
           "coverage | calibrated: / sandwich, coverage | curvature: / sandwich, coverage | pseudo: coverage |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (design, setting), g in table.groupby(["design", "setting"], sort=False):
        r = {row.estimator: row for row in g.itertuples()}
        w, sw, bm, ca, cu = r["wald"], r["wald-sandwich"], r["batch-means"], r["calibrated"], r["curvature"]
        lr, window = setting.split(" ")[1], setting.split(" ")[-1].replace("ep", " ep")
        out.append(f"| {design} | {window}, {lr} | {sw.to_observed:.3f} | "
                   f"{w.coverage95:.3f}, {sw.coverage95:.3f} | {bm.to_observed:.3f}, {bm.to_sandwich:.3f}, "
                   f"{bm.coverage95:.3f} | {ca.to_sandwich:.3f}, {ca.coverage95:.3f} | {cu.to_sandwich:.3f}, "
                   f"{cu.coverage95:.3f} | {r['pseudo'].coverage95:.3f} |")
    return out


def narrow_table(summary: pd.DataFrame) -> list[str]:
    """Every estimator against the sandwich and the bootstrap (designs without a teacher: the
    narrow student, digits)."""
    out = ["| weight decay | estimator | / sandwich | / bootstrap | Spearman \\|z\\| vs sandwich, bootstrap |",
           "| --- | --- | --- | --- | --- |"]
    for wd, g in summary.groupby("weight_decay"):
        for est in ("bootstrap", "wald", "pseudo", "pseudo-balanced", "calibrated", "batch-means",
                    "batch-means-balanced", "curvature"):
            a = g[(g.estimator == est) & (g.reference == "wald-sandwich")].iloc[0]
            b = g[(g.estimator == est) & (g.reference == "bootstrap")]
            to_b = f"{b.iloc[0].se_ratio_median:.3f}" if len(b) else ""
            rho = f"{a.spearman_z:.2f}" + (f", {b.iloc[0].spearman_z:.2f}" if len(b) else "")
            out.append(f"| {wd:g} | {est} | {a.se_ratio_median:.3f} | {to_b} | {rho} |")
    return out


MARGINAL = ("fisher", "fisher-sandwich", "kfac", "kfac-sandwich", "ekfac", "ekfac-sandwich", "block",
            "block-sandwich", "woodfisher-row", "woodfisher-row-sandwich", "batch-means", "wald")


MARGINAL_SETTINGS = ("adam lr=0.02 S=32 replacement 600/640ep", "adam lr=0.01 S=32 replacement 45/60ep",
                     "adam lr=0.01 S=32 shuffle 45/60ep", "sgd lr=0.05 S=32 replacement 45/60ep")


def marginal_glm_table(summary: pd.DataFrame, at_mean: bool = False) -> list[str]:
    """The marginal study's GLM cells (docs/calibration/marginal/study): SE ratio and coverage
    of each marginal estimator at the trained weights (``at_mean``: at the window mean, with
    McNemar's p against exact Wald on the same intervals), batch means and exact Wald beside them."""
    if at_mean:
        cols = ("fisher-sandwich@mean", "kfac-sandwich@mean", "ekfac-sandwich@mean", "block-sandwich@mean")
    else:
        cols = ("fisher-sandwich", "kfac-sandwich", "ekfac-sandwich", "block-sandwich", "woodfisher-row",
                "batch-means", "wald")
    out = ["| design | setting | " + " | ".join(cols) + " |", "| --- | --- |" + " --- |" * len(cols)]
    for design in ("logistic", "linear"):
        for setting in MARGINAL_SETTINGS:
            cells = []
            for est in cols:
                r = _row(summary, design, setting, est)
                mc = f" (p {r.mcnemar_pvalue:.2g})" if at_mean else ""
                cells.append(f"{r.se_ratio_median:.3f} / {r.coverage95:.3f}{mc}")
            out.append(f"| {design} | {_short(setting)} | " + " | ".join(cells) + " |")
    return out


def marginal_full_table(summary: pd.DataFrame) -> list[str]:
    """The marginal estimators in the full study's long-window GLM cells (2,000 intervals each):
    coverage95 [Wilson] and McNemar's p against exact Wald, at the last iterate and the window mean."""
    setting = "adam lr=0.02 S=32 replacement 600/640ep"
    cols = ("batch-means", "fisher-sandwich", "fisher-sandwich@mean", "kfac-sandwich@mean", "ekfac-sandwich@mean",
            "block-sandwich@mean", "wald")
    out = ["| design | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for design in ("logistic", "linear", "logistic-r7", "linear-r7"):
        cells = []
        for est in cols:
            r = _row(summary, design, setting, est)
            mc = "" if est == "wald" else f" (p {r.mcnemar_pvalue:.2g})"
            cells.append(f"{r.coverage95:.3f} [{r.coverage95_lo:.3f}, {r.coverage95_hi:.3f}]{mc}")
        out.append(f"| {design} | " + " | ".join(cells) + " |")
    return out


def marginal_hidden_table(summary: pd.DataFrame) -> list[str]:
    """The marginal study's hidden-layer cell: each estimator against the three references."""
    g = summary[summary.design == "teacher-regression"]
    out = ["| estimator | / sandwich | / teacher | / bootstrap | Spearman SE vs sandwich | Spearman \\|z\\| vs sandwich |",
           "| --- | --- | --- | --- | --- | --- |"]
    at_mean = ("fisher-sandwich@mean", "kfac-sandwich@mean", "ekfac-sandwich@mean", "block-sandwich@mean")
    for est in ("teacher", "bootstrap", "wald", *MARGINAL[:-1], "curvature", *at_mean):
        r = {ref: g[(g.estimator == est) & (g.reference == ref)] for ref in ("wald-sandwich", "teacher", "bootstrap")}
        cell = [f"{r[ref].iloc[0].se_ratio_median:.3f}" if len(r[ref]) else "" for ref in r]
        a = r["wald-sandwich"].iloc[0]
        out.append(f"| {est} | " + " | ".join(cell) + f" | {a.spearman_se:.2f} | {a.spearman_z:.2f} |")
    return out


def main() -> None:
    quick = pd.read_csv(HERE / "summary.csv")
    full = pd.read_csv(HERE / "full" / "summary.csv")
    print("## The quick study's GLM table\n")
    print("\n".join(quick_table(quick)))
    print("\n" + "\n".join(bootstrap_ratios(quick)))
    print("\n## The full study's long-window GLM table\n")
    print("\n".join(full_table(full)))
    print("\n" + "\n".join(bootstrap_ratios(full)))
    print("\n## Invariant targets\n")
    print("\n".join(invariant_table(pd.read_csv(HERE / "invariant.csv"))))
    print("\n## Misspecified linear designs\n")
    print("\n".join(misspecified_table(pd.read_csv(HERE / "misspecified.csv"))))
    print("\n## A narrower student\n")
    print("\n".join(narrow_table(pd.read_csv(HERE / "full" / "narrow" / "summary.csv"))))
    print("\n## Digits 64-8-10\n")
    print("\n".join(narrow_table(pd.read_csv(HERE / "full" / "digits" / "summary.csv"))))
    print("\n## FDR on the planted sparse teacher\n")
    print("\n".join(fdr_table(pd.read_csv(HERE / "fdr.csv"))))
    marginal = pd.read_csv(HERE / "marginal" / "study" / "summary.csv")
    print("\n## The marginal estimators after training (GLMs)\n")
    print("\n".join(marginal_glm_table(marginal)))
    print("\n## The marginal estimators at the window mean (GLMs)\n")
    print("\n".join(marginal_glm_table(marginal, at_mean=True)))
    print("\n## The marginal estimators in the full study's long-window cells\n")
    print("\n".join(marginal_full_table(pd.read_csv(HERE / "marginal" / "full" / "summary.csv"))))
    print("\n## The marginal estimators on the hidden layer\n")
    print("\n".join(marginal_hidden_table(marginal)))


if __name__ == "__main__":
    main()
