"""Steady-state seconds per pair of the inference command over a cohort, with and without a DataLoader worker.

    python benchmarks/cohort_throughput.py [--dataset ibsr] [--section testing] [--pairs 6] [--workers 0,1]
        [--threads 2] [--ckpt CKPT] [--configs inference.json]
        [--out runs/cohort_throughput] [--set ID=VALUE]

Runs the bundle's own inference config (the evaluator of ``configs/inference.json`` + ``--configs``) once per
``num_workers`` value on the same ordered pairs of a data set (``compare_baselines.split_pairs``; IBSR's test
pairs by default), the model loaded once per run. With ``num_workers`` 1 the next pair is loaded, checked and
pre-aligned in a DataLoader worker process while the main process runs the network and writes the current
one. The time of each pair's completion is recorded; the steady-state figure is the median interval between
consecutive completions after the first (the first includes the worker's start and ITK's lazy loading), so it is
the throughput a long cohort sees. Wall clock: run it on an otherwise idle machine (the load average at the
start is recorded). Writes ``<out>/cohort_throughput.csv`` (num_workers, pairs, first pair seconds, median and
mean seconds per pair after it, torch threads, hardware, load) and prints it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import compare_baselines  # noqa: E402

DEFAULT_CKPT = compare_baselines.DEFAULT_CKPT  # the shipped registration model of configs/inference.json
DEFAULT_CONFIGS = "inference.json"


def completion_times(pairs: list, work: Path, ckpt: Path, configs: list[str], num_workers: int,
                     overrides: dict | None = None) -> list[float]:
    """Seconds from the evaluator's start to the completion of each pair (in order)."""
    from ignite.engine import Events

    from bundle.configs import read_config

    datalist = {"testing": [{"moving": str(m["image"]), "fixed": str(f["image"]), "name": f"{m['name']}_to_{f['name']}"}
                            for m, f in pairs]}
    (work / "datalist.json").write_text(json.dumps(datalist))
    parser = read_config(REPO, configs, {"datalist": str(work / "datalist.json"), "ckpt_path": str(ckpt),
                                         "output_dir": str(work / "out"), "num_workers": num_workers, **(overrides or {})})
    evaluator = parser.get_parsed_content("evaluator")
    start, done = {}, []
    evaluator.add_event_handler(Events.STARTED, lambda e: start.update(t=time.perf_counter()))
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: done.append(time.perf_counter() - start["t"]))
    evaluator.run()
    if len(done) != len(pairs):
        raise RuntimeError(f"{len(done)} of {len(pairs)} pairs completed.")
    return done


def summarise(num_workers: int, times: list[float]) -> dict:
    """The first pair's time and the intervals between later completions."""
    intervals = [b - a for a, b in zip(times, times[1:])]
    return {"num_workers": num_workers, "pairs": len(times), "first_pair_seconds": round(times[0], 3),
            "median_seconds_per_pair": round(statistics.median(intervals), 3) if intervals else None,
            "mean_seconds_per_pair": round(statistics.mean(intervals), 3) if intervals else None}


def main() -> None:
    import torch
    from bundle.data.evaluation import DATASETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="ibsr")
    parser.add_argument("--section", choices=["testing", "validation"], default="testing")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--workers", default="0,1")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "cohort_throughput")
    parser.add_argument("--set", action="append", default=[], metavar="ID=VALUE", help="config override")
    a = parser.parse_args()
    workers = [int(w) for w in a.workers.split(",") if w]
    if a.pairs < 2 or any(w < 0 for w in workers):
        parser.error("--pairs must be >= 2 and --workers >= 0")
    if a.threads:
        torch.set_num_threads(a.threads)
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pairs = compare_baselines.split_pairs(DATASETS[a.dataset](), a.section, out / "inputs", limit=a.pairs)
    if len(pairs) < 2:
        sys.exit(f"cohort_throughput.py: error: {a.dataset} {a.section} has {len(pairs)} pair(s); 2 or more are needed.")
    load = os.getloadavg()[0]
    rows = []
    for w in workers:
        with tempfile.TemporaryDirectory(dir=out) as work:
            times = completion_times(pairs, Path(work), a.ckpt, a.configs.split(","), w,
                                     dict(compare_baselines._override(s) for s in a.set))
        rows.append({**summarise(w, times), "torch_threads": torch.get_num_threads(),
                     "hardware": compare_baselines.hardware(), "load_at_start": round(load, 2),
                     "overrides": ";".join(a.set)})
        print(rows[-1], flush=True)
    with open(out / "cohort_throughput.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"-> {out / 'cohort_throughput.csv'}")


if __name__ == "__main__":
    main()
