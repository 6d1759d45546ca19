"""Cost of the pseudo-bootstrap tracker, measured against baselines from the same run.

    python benchmarks/tracker_overhead.py [--device cpu|cuda] [--threads N]

Prints (1) one tracker update relative to one torch.optim.Adam step on the same
model (goal: <= 0.5x), and (2) the whole training-step overhead of tracking at
every=1 and every=10 for an MLP 784-300-100-10 and a small CNN at batch 128
(goal: <= 3% at every=10), and of the calibrated and batch-means estimators
against the plain pseudo bootstrap's step (goal for batch means: <= 1.1x), and of
both with gauge="balanced" (every snapshot mapped to its rescaling orbit's balanced point).
Single ops: medians of torch.utils.benchmark's blocked_autorange; training steps:
medians of interleaved blocks of 100 steps timed with time.perf_counter.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn
from torch.utils.benchmark import Timer

import mustat
from mustat import PseudoBootstrap, make_estimator


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )


def median(stmt, env, min_run_time):
    return Timer(stmt=stmt, globals=env).blocked_autorange(min_run_time=min_run_time).median


def bench(name, model, device, min_run_time, repeats):
    model = model.to(device)
    X = torch.randn(128, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=False)
        loss_fn(model(X), y).backward()
        opt.step()
        sync()

    step()
    tracker = PseudoBootstrap(model)
    tracker.update()
    tracker.update()
    env = dict(step=step, opt=opt, tracker=tracker, sync=sync)
    t_adam = median("opt.step(); sync()", env, min_run_time)
    t_upd = median("tracker.update(); sync()", env, min_run_time)
    n = sum(p.numel() for p in tracker._mean)
    print(f"{name}: {n:,} tracked weights")
    print(f"  Adam step            {t_adam * 1e3:8.3f} ms")
    print(f"  tracker update       {t_upd * 1e3:8.3f} ms   ratio {t_upd / t_adam:5.2f}x an Adam step")
    pruned = copy.deepcopy(model)
    mustat.prune(pruned, mustat.score(pruned, "magnitude"), sparsity=0.5)
    masked = PseudoBootstrap(pruned)
    masked.update()
    t_masked = median("masked.update(); sync()", dict(masked=masked, sync=sync), min_run_time)
    print(f"  update, 50% pruned   {t_masked * 1e3:8.3f} ms   ratio {t_masked / t_adam:5.2f}x (masks applied on the fly)")
    configs = {"no tracker": None, "every=1": ("pseudo", {}), "every=10": ("pseudo", dict(every=10)),
               "calibrated (grad moments)": ("calibrated", {}),
               "batch-means (b=100)": ("batch-means", dict(batch_steps=100)),
               "every=1, gauge=balanced": ("pseudo", dict(gauge="balanced")),
               "batch-means, gauge=balanced": ("batch-means", dict(batch_steps=100, gauge="balanced"))}
    estimators = {k: make_estimator(v[0], model, **v[1]) for k, v in configs.items() if v}
    # Whole training steps, the configurations interleaved (10 warm-up steps, then 100 timed)
    # and repeated, so drift in machine load hits them alike; medians over the repetitions.
    times = {k: [] for k in configs}
    for _ in range(repeats):
        for label in configs:
            handle = estimators[label].attach(opt) if label in estimators else None
            for _ in range(10):
                step()
            t0 = time.perf_counter()
            for _ in range(100):
                step()
            times[label].append((time.perf_counter() - t0) / 100)
            if handle:
                handle.remove()
    base, pseudo = statistics.median(times["no tracker"]), statistics.median(times["every=1"])
    print(f"  train step, no tracker {base * 1e3:8.3f} ms   (median of {repeats} interleaved blocks of 100 steps)")
    for label in list(configs)[1:]:
        t = statistics.median(times[label])
        print(f"  train step, {label:<28s} {t * 1e3:8.3f} ms   overhead {100 * (t / base - 1):+5.1f}%"
              f"   ({t / pseudo:.3f}x the pseudo bootstrap's step)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=12, help="interleaved repetitions of each training-step block")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    bench("MLP 784-300-100-10, batch 128", mlp(), device, args.min_run_time, args.repeats)
    bench("LeNet-5 CNN, batch 128", cnn(), device, args.min_run_time, args.repeats)


if __name__ == "__main__":
    main()
