"""Why three shots of the loss statistic failed on SmolLM2-135M at 70% (REPRODUCTION section 7).

Seed 0's calibration, ``mu`` with ``sigma="loss"``, the global scope and the update (no refit):
one shot to 46.7% against two shots (23.3%, then 46.7%, every statistic re-estimated in between,
what ``shots=3`` does on its way to 70%). Prints the two perplexities; the loss's output factor
``B`` of block ``--block``'s query projection before and after the first shot (the ratio's
quantiles over its rows); then the two-shot model's perplexity with that block's weights, its
query projection, and one head's query rows put back to the one-shot model's (which block is the
damage). Finally the same two shots with ``loss_damping=0.01``. One thread; about 15 minutes here.

    OMP_NUM_THREADS=1 .venv/bin/python docs/oneshot/shots_diagnosis.py [--block 18] [--head 8]
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from mustat._params import entries  # noqa: E402
from mustat.layers import find_targets  # noqa: E402
from mustat.layerwise import oneshot  # noqa: E402
from mustat.statistics import causal_lm_loss, output_fisher  # noqa: E402

STEPS = (0.7 / 3, 1.4 / 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, default=18)
    ap.add_argument("--head", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import high_sparsity

    setup = high_sparsity.SmolLM2()
    cal = setup.calibration(0)
    options = dict(method="mu", sigma="loss", scope="global", update=True, loss="causal-lm", progress=False)
    query = f"model.layers.{args.block}.self_attn.q_proj.weight"

    def prune(model, sparsity, **extra):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            oneshot(model, cal, sparsity=sparsity, **options, **extra)

    def factor(model):
        targets, _ = find_targets(model, entries(model), [query], ())
        return output_fisher(model, cal, targets, causal_lm_loss)[query]

    one = copy.deepcopy(setup.model)
    prune(one, STEPS[1])
    print(f"one shot to {STEPS[1]:.1%}: perplexity {setup.score(one):.2f}", flush=True)
    two = copy.deepcopy(setup.model)
    before = factor(two)
    prune(two, STEPS[0])
    after = factor(two)
    prune(two, STEPS[1])
    print(f"two shots to {STEPS[1]:.1%}: perplexity {setup.score(two):.2f}", flush=True)
    q = torch.quantile(after / before, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=after.dtype))
    print(f"block {args.block} query rows, B after the first shot / B dense: min, 10%, median, 90%, max "
          f"{', '.join(f'{float(x):.3g}' for x in q)}", flush=True)
    width = two.config.hidden_size // two.config.num_attention_heads
    rows = slice(args.head * width, (args.head + 1) * width)
    mine, theirs = two.state_dict(), one.state_dict()
    for what, keys, index in (
            (f"block {args.block}", [k for k in mine if k.startswith(f"model.layers.{args.block}.")], slice(None)),
            (f"block {args.block}'s query projection",
             [k for k in mine if k.startswith(f"model.layers.{args.block}.self_attn.q_proj.")], slice(None)),
            (f"head {args.head}'s query rows of block {args.block}",
             [k for k in mine if k.startswith(f"model.layers.{args.block}.self_attn.q_proj.")], rows)):
        patched = copy.deepcopy(two)
        state = {k: v.clone() for k, v in mine.items()}
        for k in keys:
            state[k][index] = theirs[k][index]
        patched.load_state_dict(state)
        print(f"two shots with {what} from the one-shot model: perplexity {setup.score(patched):.2f}", flush=True)
    damped = copy.deepcopy(setup.model)
    for s in STEPS:
        prune(damped, s, loss_damping=0.01)
    print(f"two shots to {STEPS[1]:.1%} with loss_damping=0.01: perplexity {setup.score(damped):.2f}", flush=True)


if __name__ == "__main__":
    main()
