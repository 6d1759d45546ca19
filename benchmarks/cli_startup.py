"""Start-up time of the ``mustat`` command: ``mustat --help`` and every subcommand's ``--help``,
against ``python -c pass`` timed in the same run (the interpreter's own start-up, the floor).

Each command is a fresh process (the console script next to this interpreter), run ``--runs``
times; the commands are interleaved round by round so that a burst of load on a shared machine
hits all of them alike. Prints the load average before and after, then a Markdown table of the
min and median wall time and the median's ratio to the baseline's median.

``--compare DIR`` also times the same commands with another copy of the code first on the path
(``PYTHONPATH=DIR``, e.g. an older commit unpacked by ``git archive``), interleaved with these,
so a before/after pair shares the machine's load:

    .venv/bin/python benchmarks/cli_startup.py            # 7 runs each
    git archive ebdd7a4 mustat validation | tar -x -C /tmp/before
    .venv/bin/python benchmarks/cli_startup.py --compare /tmp/before --runs 9
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def subcommands(script: Path) -> list[str]:
    """The subcommands ``mustat --help`` lists (its ``{a,b,...}`` usage line), so a new one is timed
    without editing this script."""
    text = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    usage = text.split("{", 1)[1].split("}", 1)[0]
    return usage.split(",")


def wall(argv: list[str], env: dict[str, str] | None = None) -> float:
    """Seconds one run of ``argv`` takes, start to exit (its output discarded; a failure raises)."""
    t = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=env)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="runs of each command")
    parser.add_argument("--compare", type=Path, default=None, metavar="DIR",
                        help="also time the commands with the mustat and validation packages in DIR")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    if args.compare is not None and not (args.compare / "mustat" / "cli.py").is_file():
        parser.error(f"--compare {str(args.compare)!r} holds no mustat/cli.py: unpack a commit there "
                     "(git archive COMMIT mustat validation | tar -x -C DIR)")
    script = Path(sys.executable).with_name("mustat")
    if not script.is_file():
        sys.exit(f"no console script {script}: install the package (pip install -e .)")
    here = {**os.environ, "PYTHONPATH": ""}
    # the console script's own folder, not the working directory, heads its sys.path, so PYTHONPATH
    # puts the other copy ahead of the installed (editable) one
    there = {**os.environ, "PYTHONPATH": str(args.compare.resolve())} if args.compare else None
    commands = {"python -c pass": ([sys.executable, "-c", "pass"], here)}
    for name in ["", *subcommands(script)]:
        argv = [str(script), *([name] if name else []), "--help"]
        label = " ".join(["mustat", *([name] if name else []), "--help"])
        commands[label] = (argv, here)
        if there is not None:
            commands[f"{label} ({args.compare})"] = (argv, there)
    for argv, env in commands.values():  # warm the file cache once, untimed
        wall(argv, env)
    times: dict[str, list[float]] = {k: [] for k in commands}
    load_before = os.getloadavg()
    for _ in range(args.runs):
        for k, (argv, env) in commands.items():
            times[k].append(wall(argv, env))
    load_after = os.getloadavg()
    base = statistics.median(times["python -c pass"])
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, {args.runs} runs each; 1-min load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after\n")
    print("| command | min (s) | median (s) | median / python -c pass |")
    print("| --- | ---: | ---: | ---: |")
    for k, ts in times.items():
        print(f"| `{k}` | {min(ts):.3f} | {statistics.median(ts):.3f} | {statistics.median(ts) / base:.1f}x |")


if __name__ == "__main__":
    main()
