"""Per-stage timing of the whole inference pipeline, with the classical peers timed in the same run.

    python benchmarks/pipeline_stages.py [--dataset ibsr] [--pairs 4] [--peers greedy,ants_syn] [--threads 2]

Runs the bundle's own inference config (``configs/inference.json`` + ``--configs`` overlays) on the test pairs of a
data set, applying its pre-processing transforms, the inferer (network, and instance optimisation when set) and
its post-processing transforms one at a time, each timed: loading, checks, affine pre-alignment, resampling to the
network grid, the network, the DDF to the native grid, composition, warping, Jacobian, writing. The first pair is
run once untimed (warm-up: ITK and torch initialise lazily), then every pair is timed. The peers (greedy, ANTs SyN;
``benchmarks/compare_baselines.py``'s runners) register the same pairs in the same run, so the ratio is measured.

Writes ``<out>/stages.csv`` (pair, stage, wall seconds, process CPU seconds) and ``<out>/summary.csv`` (stage,
median wall and CPU seconds over the pairs; ``total``; each peer's median and the ratio peer / ours), and prints the summary with the hardware and the
load average at the start.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import compare_baselines  # noqa: E402  (the peers' runners, the pairs and the hardware line)


def _stage_names(transforms) -> list[str]:
    """One name per transform (its class; repeated classes numbered)."""
    counts, names = defaultdict(int), []
    for t in transforms:
        name = type(t).__name__
        counts[name] += 1
        names.append(name if counts[name] == 1 else f"{name}_{counts[name]}")
    return names


class _Clock:
    """Wall-clock and process CPU seconds (all threads) of one stage: on a CPU shared with other jobs the CPU
    time is the steadier figure."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return False


def time_pair(parts: dict, item: dict) -> list[tuple[str, float, float]]:
    """Run one pair through the pipeline ``parts`` (parsed config objects), timing every stage:
    ``(stage, wall seconds, CPU seconds)``."""
    import torch
    from monai.data import decollate_batch, list_data_collate
    from monai.transforms import apply_transform

    timings = []
    data = dict(item)
    pre = parts["preprocessing"].transforms
    for name, transform in zip(_stage_names(pre), pre):
        with _Clock() as clock:
            data = apply_transform(transform, data)
        timings.append((f"pre:{name}", clock.wall, clock.cpu))
    batch = list_data_collate([data])
    with _Clock() as clock:
        inputs, _ = parts["prepare_batch"](batch, parts["device"])
        with torch.no_grad():
            pred = parts["inferer"](inputs, parts["network"])
    timings.append(("network" if not getattr(parts["inferer"], "steps", 0) else "network+refinement", clock.wall, clock.cpu))
    data = {**decollate_batch(batch)[0], "pred": pred[0]}
    post = parts["postprocessing"].transforms
    for name, transform in zip(_stage_names(post), post):
        with _Clock() as clock:
            data = apply_transform(transform, data)
        timings.append((f"post:{name}", clock.wall, clock.cpu))
    return timings


def pipeline(configs: list[str], overrides: dict) -> dict:
    """The parsed pieces of the inference config that :func:`time_pair` runs."""
    from bundle.configs import read_config

    parser = read_config(REPO, configs, overrides)
    parts = {k: parser.get_parsed_content(k) for k in ("preprocessing", "postprocessing", "prepare_batch", "inferer",
                                                      "network", "device", "data")}
    parts["network"].eval()
    return parts


def run(dataset, out: Path, ckpt: Path, configs: list[str], pairs_limit: int | None, peers: list[str],
        overrides: dict | None = None) -> list[dict]:
    """Time every stage on the test pairs of ``dataset`` and each peer on the same pairs; write the CSVs."""
    out = Path(out).resolve()  # the datalist names its files relative to its own folder
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    pairs = compare_baselines.split_pairs(dataset, "testing", out / "inputs", limit=pairs_limit)
    datalist = {"testing": [{"moving": str(m["image"]), "fixed": str(f["image"]), "moving_label": str(m["label"]),
                             "name": f"{m['name']}_to_{f['name']}"} for m, f in pairs]}
    (out / "datalist.json").write_text(json.dumps(datalist))
    parts = pipeline(configs, {"datalist": str(out / "datalist.json"), "ckpt_path": str(ckpt),
                               "output_dir": str(out / "outputs"), **(overrides or {})})
    time_pair(parts, parts["data"][0])  # warm-up, not recorded
    rows = []
    for item in parts["data"]:
        timings = time_pair(parts, item)
        for stage, seconds, cpu in timings:
            rows.append({"pair": item["name"], "stage": stage, "seconds": seconds, "cpu_seconds": cpu})
        rows.append({"pair": item["name"], "stage": "total", "seconds": sum(t[1] for t in timings),
                     "cpu_seconds": sum(t[2] for t in timings)})
    for peer in peers:
        runner = compare_baselines.RUNNERS[peer]
        for m, f in pairs:
            work = out / "peers" / peer / f"{m['name']}_to_{f['name']}"
            work.mkdir(parents=True, exist_ok=True)
            rows.append({"pair": f"{m['name']}_to_{f['name']}", "stage": f"peer:{peer}", "seconds": runner(m, f, work)[2],
                         "cpu_seconds": ""})  # the peers run in other processes (and their threads): wall clock only
    with open(out / "stages.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["pair", "stage", "seconds", "cpu_seconds"])
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows, compare_baselines.hardware(), load)
    with open(out / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    return summary


def summarise(rows: list[dict], hardware: str, load: float) -> list[dict]:
    """Median seconds per stage over the pairs (stages in pipeline order), and each peer's ratio to our total."""
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    medians = {s: statistics.median(float(r["seconds"]) for r in rows if r["stage"] == s) for s in stages}
    cpu = {s: statistics.median(float(r["cpu_seconds"]) for r in rows if r["stage"] == s)
           for s in stages if all(r.get("cpu_seconds", "") != "" for r in rows if r["stage"] == s)}
    pairs = len({r["pair"] for r in rows if r["stage"] == "total"})
    summary = []
    for stage in stages:
        ratio = medians[stage] / medians["total"] if stage.startswith("peer:") and medians.get("total") else None
        summary.append({"stage": stage, "median_seconds": round(medians[stage], 4),
                        "median_cpu_seconds": round(cpu[stage], 4) if stage in cpu else "", "pairs": pairs,
                        "ratio_to_ours": "" if ratio is None else round(ratio, 2),
                        "hardware": hardware, "load_at_start": round(load, 2)})
    return summary


def main() -> None:
    from bundle.data.evaluation import DATASETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="ibsr")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "pipeline_stages")
    parser.add_argument("--ckpt", type=Path, default=compare_baselines.DEFAULT_CKPT)
    parser.add_argument("--configs", default="inference.json", help="inference config list, comma separated")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--peers", default="greedy", help="comma separated: greedy, ants_syn, elastix, ... ('' for none)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--set", action="append", default=[], metavar="ID=VALUE", help="config override")
    a = parser.parse_args()
    if a.threads is not None:
        import torch

        torch.set_num_threads(a.threads)
    overrides = dict(compare_baselines._override(item) for item in a.set)
    summary = run(DATASETS[a.dataset](), a.out, a.ckpt, a.configs.split(","), a.pairs,
                  [p for p in a.peers.split(",") if p], overrides)
    print(f"{summary[0]['hardware']}; load {summary[0]['load_at_start']} at start; median of {summary[0]['pairs']} pairs")
    for row in summary:
        ratio = f"  ({row['ratio_to_ours']}x ours)" if row["ratio_to_ours"] != "" else ""
        cpu = f"{row['median_cpu_seconds']:9.3f} s CPU" if row["median_cpu_seconds"] != "" else " " * 15
        print(f"{row['stage']:36s} {row['median_seconds']:9.3f} s {cpu}{ratio}")


if __name__ == "__main__":
    main()
