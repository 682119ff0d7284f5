#!/usr/bin/env python3
"""Measures the Python API's overhead on large launches and listings (not a test).

Build the module in release first (`maturin build --release -m butler-py/Cargo.toml` and
install the wheel, or `maturin develop --release -m butler-py/Cargo.toml`), then:

    python butler-py/benches/overhead.py [--launch 10000] [--runs 100000]

Prints the best and median of a few repetitions for:
- `launch` of N configs given as dicts (one launch into a fresh analysis each time);
- `runs()` returning every run of a store holding M runs;
- reading `status` of every returned run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import butler


def timed(label: str, repeat: int, action: Callable[[int], Any]) -> None:
    seconds = []
    for i in range(repeat):
        started = time.perf_counter()
        action(i)
        seconds.append(time.perf_counter() - started)
    print(f"{label}: best {min(seconds):.3f} s, median {statistics.median(seconds):.3f} s ({repeat} runs)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--launch", type=int, default=10_000, help="configs per timed launch")
    parser.add_argument("--runs", type=int, default=100_000, help="runs in the store for runs()")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        client = butler.connect(db=f"sqlite://{tmp}/butler.db", home=f"{tmp}/home")
        workflow = client.create_workflow(
            "bench",
            "1",
            {"reference": "GRCh38", "threads": 4},
            {"tasks": [{"id": "align", "run": "echo {{ config.sample }} {{ config.threads }}"}]},
        )
        print(f"butler {butler.__version__}, store {client.db}")

        def configs(batch: int, count: int) -> list[dict[str, Any]]:
            return [
                {"sample": f"S{batch:03}-{i:06}", "lane": i % 8, "reads": [f"r1_{i}.fq", f"r2_{i}.fq"]}
                for i in range(count)
            ]

        batches = [configs(b, args.launch) for b in range(args.repeat)]

        def launch(i: int) -> None:
            analysis = client.create_analysis(f"launch-{i}", config={})
            runs = client.launch(workflow, analysis, batches[i])
            assert len(runs) == args.launch

        timed(f"launch of {args.launch} dict configs", args.repeat, launch)

        # Fill the store up to the listing size with more launches (untimed).
        filler = client.create_analysis("filler", config={})
        have = args.repeat * args.launch
        batch = 1000
        while have < args.runs:
            count = min(10_000, args.runs - have)
            client.launch(workflow, filler, configs(batch, count))
            have += count
            batch += 1

        listed: list[butler.Run] = []

        def list_runs(_: int) -> None:
            listed[:] = client.runs()
            assert len(listed) == args.runs

        timed(f"runs() returning {args.runs} runs", args.repeat, list_runs)
        timed(
            f"reading .status of {args.runs} runs",
            args.repeat,
            lambda _: [run.status for run in listed],
        )


if __name__ == "__main__":
    main()
