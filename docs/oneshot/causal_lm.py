"""One-shot pruning of a small GPT-2-style causal language model trained here on offline text.

The text is the Python documentation (``pydoc_data.topics``), read as characters. Every tenth
topic (in sorted order) is held out; the model trains on the rest. The model is a
``transformers`` GPT2LMHeadModel (4 layers, width 128, 4 heads, context 128). Its attention and MLP
layers are ``Conv1D``, and its head is tied to the embedding, so the head is not pruned. It trains
for ``--steps`` AdamW steps, seed 0; the trained model is kept in runs/ and reused. Each method
then prunes a copy from 128 calibration windows of the training text (per calibration seed).
Perplexity is measured on every non-overlapping 128-character window of the held-out text. Rows
go to ``lm_results.csv`` (atomically, resumable) and a table to ``lm_summary.md``.

    python docs/oneshot/causal_lm.py              # train (about 6 min on 2 cores), then prune
    python docs/oneshot/causal_lm.py --report     # only rewrite lm_summary.md
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mustat._io import atomic_write
from mustat.layerwise import oneshot

HERE = Path(__file__).parent
CACHE = Path(__file__).resolve().parents[2] / "runs" / "models"
CONTEXT = 128
TARGETS = ("0.5", "0.6", "2:4")
METHODS = {
    "magnitude": dict(method="magnitude"),
    "wanda": dict(method="wanda"),
    "sparsegpt": dict(method="sparsegpt", scope="layer"),
    "mu (row)": dict(method="mu"),
    "mu + update (row)": dict(method="mu", update=True),
    "mu + update (layer)": dict(method="mu", scope="layer", update=True),
    "mu-sandwich + update (row)": dict(method="mu-sandwich", update=True),
}


def corpus() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    train = "\n\n".join(topics[k] for i, k in enumerate(keys) if i % 10 != 9)
    held = "\n\n".join(topics[k] for i, k in enumerate(keys) if i % 10 == 9)
    chars = sorted(set(train) | set(held))
    index = {c: i for i, c in enumerate(chars)}
    encode = lambda s: torch.tensor([index[c] for c in s], dtype=torch.long)  # noqa: E731
    return encode(train), encode(held), chars


def windows(ids: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - CONTEXT - 1, (count,), generator=g)
    return torch.stack([ids[s:s + CONTEXT] for s in starts.tolist()])


def build(vocab: int):
    import transformers

    config = transformers.GPT2Config(vocab_size=vocab, n_embd=128, n_layer=4, n_head=4, n_positions=CONTEXT,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def train(steps: int, train_ids: torch.Tensor, vocab: int):
    import transformers

    folder = CACHE / f"pydoc-gpt2-{steps}"
    if (folder / "config.json").exists():
        return transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    torch.manual_seed(0)
    model = build(vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    t = time.perf_counter()
    for step in range(steps):
        x = windows(train_ids, 32, 1000 + step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"step {step}: train loss {loss.item():.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    model.eval()
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(folder)
    return model


@torch.no_grad()
def perplexity(model, held_ids: torch.Tensor) -> float:
    n = (len(held_ids) - 1) // CONTEXT
    x = held_ids[: n * CONTEXT].view(n, CONTEXT)
    total, count = 0.0, 0
    for b in x.split(64):
        loss = model(input_ids=b, labels=b).loss   # mean over the CONTEXT - 1 predicted characters
        total += float(loss) * b.shape[0] * (CONTEXT - 1)
        count += b.shape[0] * (CONTEXT - 1)
    return math.exp(total / count)


def run(steps: int, seeds: list[int], out: Path) -> None:
    train_ids, held_ids, chars = corpus()
    model = train(steps, train_ids, len(chars))
    rows = pd.read_csv(out).to_dict("records") if out.exists() else []
    done = {(r["method"], str(r["target"]), int(r["seed"])) for r in rows}
    if ("dense", "0", 0) not in done:
        rows.append(dict(method="dense", target="0", seed=0, perplexity=perplexity(model, held_ids), seconds=0.0,
                         error=0.0, sparsity=0.0))
    for target in TARGETS:
        for label, opts in METHODS.items():
            if ":" in target and opts.get("scope", "row") != "row":
                if opts["method"] != "sparsegpt":
                    continue  # N:M fixes every group: only the row scope exists
                opts = {k: v for k, v in opts.items() if k != "scope"}
            for seed in seeds[:1] if opts["method"] == "magnitude" else seeds:
                if (label, target, seed) in done:
                    continue
                kw = dict(opts, **({"pattern": target} if ":" in target else {"sparsity": float(target)}))
                pruned = copy.deepcopy(model)
                cal = [{"input_ids": b} for b in windows(train_ids, 128, seed).split(32)]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    report = oneshot(pruned, cal, **kw)
                rows.append(dict(method=label, target=target, seed=seed, perplexity=perplexity(pruned, held_ids),
                                 seconds=report.seconds, error=float(report.layers["error"].mean()),
                                 sparsity=report.pruning.sparsity))
                print(f"{label:28s} {target:4s} seed {seed}: perplexity {rows[-1]['perplexity']:.3f}", flush=True)
                frame = pd.DataFrame(rows)
                atomic_write(out, lambda p, f=frame: f.to_csv(p, index=False))


def summary(results: Path, dest: Path) -> None:
    r = pd.read_csv(results)
    r["target"] = r["target"].astype(str)
    dense = float(r.loc[r.method == "dense", "perplexity"].iloc[0])
    lines = [f"# One-shot pruning of a character-level GPT-2 trained on the Python docs ({date.today()}, "
             f"{platform.machine()}, {torch.get_num_threads()} threads)", "",
             f"Command: `python docs/oneshot/causal_lm.py`. Held-out perplexity (per character) of the dense model: "
             f"**{dense:.3f}**. Mean over 3 calibration seeds (sd); magnitude needs no calibration. Error: mean "
             "relative reconstruction error of the 16 pruned layers on the calibration inputs.", ""]
    for t in TARGETS:
        sub = r[r.target == t].groupby("method").agg(ppl=("perplexity", "mean"), sd=("perplexity", "std"),
                                                     error=("error", "mean"), seconds=("seconds", "median"),
                                                     seeds=("seed", "nunique")).sort_values("ppl")
        if sub.empty:
            continue
        lines += [f"## {t if ':' in t else f'{float(t):.0%} unstructured'}", "",
                  "| method | perplexity | layer error | seconds | seeds |", "|---|---|---|---|---|"]
        for m, x in sub.iterrows():
            sd = "" if np.isnan(x.sd) else f" ({x.sd:.3f})"
            lines.append(f"| {m} | {x.ppl:.3f}{sd} | {x.error:.4f} | {x.seconds:.1f} | {int(x.seeds)} |")
        lines.append("")
    atomic_write(dest, lambda p: Path(p).write_text("\n".join(lines)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds")
    ap.add_argument("--out", type=Path, default=HERE / "lm_results.csv")
    ap.add_argument("--report", action="store_true", help="only rewrite lm_summary.md")
    args = ap.parse_args()
    if not args.report:
        run(args.steps, [int(s) for s in args.seeds.split(",")], args.out)
    summary(args.out, HERE / "lm_summary.md")


if __name__ == "__main__":
    main()
