"""One third of the key/value groups and one third of the MLP neurons of a LLaMA model of
SmolLM2-135M's shape removed in one shot: measured CPU prefill latency against the dense model,
beside the reduction of multiply-accumulates (``mustat.structured.heads``, ``mustat.structured.ffn``).

The model is built from a ``LlamaConfig`` of SmolLM2-135M's shape (hidden 576, 9 query heads over 3
key/value heads of 64, gated MLP of 1,536, 30 layers, vocabulary 49,152, tied embeddings) with
random weights (seed 0): latency depends on the shapes only, so no checkpoint is needed, and the
perplexity of a random model means nothing (it is not reported). Every block loses one of its 3
key/value groups (with the 3 query heads it serves: ``q_proj`` 576 -> 384 rows, ``k_proj`` and
``v_proj`` 192 -> 128, ``o_proj`` 576 -> 384 columns, refitted by least squares) and 512 of its
1,536 neurons (``gate_proj``/``up_proj`` rows and ``down_proj`` columns, refitted), ranked by the
OBS score on 8 random sequences of 128 tokens. The pruned model is saved with ``save_pretrained``
and reloaded with ``from_pretrained``: its logits must be identical.

Prefill: ``model(input_ids, logits_to_keep=1)`` (what ``generate`` runs on a prompt: the key/value
cache filled, logits of the last position only) on 1 and on 8 sequences of 256 tokens, dense and
pruned timed alternately (``mustat.structured.paired_latency``: 3 rounds, median), float32, on
``--threads`` intra-op threads. MACs: ``torch.utils.flop_counter.FlopCounterMode`` on the same
call (every matrix product, the attention's included), halved.

    python docs/structured/llama_gqa.py --repeats 5     # 13 minutes on 1 thread of the shared 2-core box
    python docs/structured/llama_gqa.py --layers 2      # a quick check of the script
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
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from mustat._io import atomic_write
from mustat.structured import paired_latency, prune_ffn, prune_heads

HERE = Path(__file__).parent
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu")


class Prefill(nn.Module):
    """``model(ids, logits_to_keep=1).logits``: one tensor in, for the timer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids, logits_to_keep=1).logits


def macs(model: nn.Module, ids: Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        Prefill(model)(ids)
    return counter.get_total_flops() // 2


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "llama_gqa"))
    args = ap.parse_args()

    cfg = transformers.LlamaConfig(num_hidden_layers=args.layers, attn_implementation="sdpa", **SMOLLM2_135M)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    cal = [dict(input_ids=torch.randint(0, cfg.vocab_size, (2, 128), generator=g),
                attention_mask=torch.ones(2, 128, dtype=torch.long)) for _ in range(4)]
    pruned = copy.deepcopy(dense)
    t0 = time.perf_counter()
    heads = prune_heads(pruned, cal, 1 / 3, "obs")
    neurons = prune_ffn(pruned, cal, 1 / 3, "obs", round_to=8)
    seconds = time.perf_counter() - t0
    c = pruned.config
    print(f"pruned in {seconds:.1f} s: {set(heads.values())} query heads, {c.num_key_value_heads} kv heads, "
          f"{set(neurons.values())} neurons per block")

    probe = torch.randint(0, cfg.vocab_size, (1, 256), generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        pruned.save_pretrained(tmp)
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp, local_files_only=True,
                                                                   dtype=torch.float32).eval()
        with torch.no_grad():
            identical = torch.equal(again(input_ids=probe).logits, pruned(input_ids=probe).logits)
    print(f"save_pretrained -> from_pretrained: logits identical: {identical}")

    rows = []
    for batch in (1, 8):
        ids = torch.randint(0, cfg.vocab_size, (batch, 256), generator=g)
        m_d, m_p = macs(dense, ids), macs(pruned, ids)
        load = os.getloadavg()[0]
        t_d, t_p = paired_latency(Prefill(dense), Prefill(pruned), ids, repeats=args.repeats,
                                  threads=args.threads, min_run_time=0.5)
        rows.append(dict(batch=batch, tokens=256, dense_macs=m_d, pruned_macs=m_p, mac_reduction=m_d / m_p,
                         dense_s=t_d, pruned_s=t_p, speedup=t_d / t_p, ratio=(t_d / t_p) / (m_d / m_p),
                         load_before=load, load_after=os.getloadavg()[0]))
        print(rows[-1])
    table = pd.DataFrame(rows)
    n_d = sum(p.numel() for p in dense.parameters())
    n_p = sum(p.numel() for p in pruned.parameters())
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = Path(args.out)
    atomic_write(out.with_suffix(".csv"), lambda p: table.to_csv(p, index=False))
    lines = [
        "# GQA groups and gated-MLP neurons removed from a LLaMA of SmolLM2-135M's shape: CPU prefill", "",
        f"Produced by `python docs/structured/llama_gqa.py --layers {args.layers} --threads {args.threads} "
        f"--repeats {args.repeats}` on "
        f"{when} ({platform.machine()}, {os.cpu_count()} cores shared with other jobs, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, float32, {args.threads} intra-op thread(s), dense and pruned timed "
        f"alternately, median of {args.repeats} rounds; random weights, seed 0). One of the 3 key/value groups "
        f"(with its 3 query heads) and one third of the neurons removed from each of the {args.layers} blocks by the "
        f"OBS score with least-squares refits ({seconds:.1f} s): query heads 9 -> {c.num_attention_heads}, "
        f"key/value heads 3 -> {c.num_key_value_heads}, intermediate 1536 -> {c.intermediate_size}; parameters "
        f"{n_d / 1e6:.1f}M -> {n_p / 1e6:.1f}M (the tied 28.3M-parameter embedding unchanged). Reloaded with "
        f"`from_pretrained` from the saved folder: logits identical: {identical}. Prefill: "
        "`model(ids, logits_to_keep=1)`; MACs counted by `FlopCounterMode` (every matrix product, attention "
        "included). Ratio: measured speed-up over MAC reduction (goal at batch 8: at least 0.8). Load: the box's "
        "1-minute load average before and after the timing (2 cores).", "",
        "| batch x tokens | dense GMACs | pruned GMACs | MAC reduction | dense s | pruned s | speed-up | ratio | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} x {r['tokens']} | {r['dense_macs'] / 1e9:.1f} | {r['pruned_macs'] / 1e9:.1f} | "
                     f"{r['mac_reduction']:.2f}x | {r['dense_s']:.3f} | {r['pruned_s']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['ratio']:.2f} | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    atomic_write(out.with_suffix(".md"), lambda p: Path(p).write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
