#!/usr/bin/env python3
"""Write one JSON run config per sample into a directory, then launch the directory.

Uses only the public API of the `butler` module. With wait_and_summarise.py beside it:

    id=$(python examples/python/write_and_launch.py | tail -n1)
    python examples/python/wait_and_summarise.py --analysis "$id"

Each config names a sample, its FASTQ pair and a per-sample `min_quality`; the workflow's
stand-in tasks only print what a real pipeline would do with them. The workflow is registered
once (found again by name and version); every call makes a new analysis. The store is
BUTLER_DB, or $BUTLER_HOME/butler.db (BUTLER_HOME defaults to ~/.butler), or the --db URL.
The last line printed is the analysis id and nothing else.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import butler

WORKFLOW = "align-sample"
VERSION = "1.0"
# Defaults for every run; the analysis and each run's config may override them.
WORKFLOW_CONFIG = {"reference": "GRCh38", "min_quality": 20, "fail": False}
# The same shape as a TOML or JSON definition file.
DEFINITION = {
    "tasks": [
        {
            "id": "trim",
            "run": (
                "{% if config.fail %}echo '{{ config.sample }} is marked to fail' >&2; exit 3"
                "{% else %}echo 'trim {{ config.fastq.r1 }} {{ config.fastq.r2 }}"
                " at Q{{ config.min_quality }}'{% endif %}"
            ),
            "timeout": "1m",
        },
        {
            "id": "align",
            "run": "echo 'align {{ config.sample }} to {{ config.reference }}, {{ config.batch }}'",
            "needs": ["trim"],
            "timeout": "1m",
        },
    ]
}


def sample_config(i: int, fastq_dir: Path, fail_every: int) -> dict[str, Any]:
    """The run config of the i-th sample (from 1)."""
    sample = f"S{i:04}"
    config: dict[str, Any] = {
        "sample": sample,
        "fastq": {
            "r1": str(fastq_dir / f"{sample}_R1.fastq.gz"),
            "r2": str(fastq_dir / f"{sample}_R2.fastq.gz"),
        },
        "min_quality": (20, 25, 30)[i % 3],
    }
    if fail_every > 0 and i % fail_every == 0:
        config["fail"] = True
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="store URL (default: BUTLER_DB or $BUTLER_HOME/butler.db)")
    parser.add_argument("--out", help="where the configs go (default: runs/ in a new temp dir)")
    parser.add_argument("--samples", type=int, default=1000, help="samples (default: 1000)")
    parser.add_argument(
        "--fastq-dir", default="/data/fastq", help="the FASTQ files' folder (default: /data/fastq)"
    )
    parser.add_argument("--fail-every", type=int, default=0, help="make every Nth sample fail")
    args = parser.parse_args()
    if args.samples < 1:
        parser.error(f"--samples {args.samples}: give at least 1")

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="butler-")) / "runs"
    # Launching a directory takes every JSON file under it, so stale configs would become runs.
    if out.is_dir() and any(out.rglob("*.json")):
        parser.error(f"--out {out}: already holds JSON run configs; give an empty or new directory")
    out.mkdir(parents=True, exist_ok=True)
    for i in range(1, args.samples + 1):
        config = sample_config(i, Path(args.fastq_dir), args.fail_every)
        (out / f"{config['sample']}.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"Wrote {args.samples} run configs to {out}")

    client = butler.connect(db=args.db)
    existing = [w for w in client.list_workflows() if (w.name, w.version) == (WORKFLOW, VERSION)]
    if existing:
        workflow = existing[0]
    else:
        workflow = client.create_workflow(WORKFLOW, VERSION, WORKFLOW_CONFIG, DEFINITION)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    name = f"batch-{stamp}"
    analysis = client.create_analysis(name, config={"batch": name})

    runs = client.launch(workflow, analysis, out)
    print(f"Launched {len(runs)} runs of {workflow.name} {workflow.version} for {analysis.name}")
    print(analysis.id)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except butler.ButlerError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
