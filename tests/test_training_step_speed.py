"""The training-step benchmark (docs/results/training_step_cpu.csv, regularisation/search_step_cpu.csv) on a tiny grid:
one CSV row per configuration, with the settings, the hardware and the load."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "training_step_speed.py"


@pytest.mark.parametrize("model, expected", [
    ("search", ["VM-2 (All-3-Conv), recipe step", "search mixture network (8 operations per block), recipe step",
                "search mixture network, half width (the search's proxy), recipe step"]),
    ("registration", ["half-res SVF, fp32, labels /2 (recipe)"]),
])
def test_one_row_per_configuration(tmp_path, model, expected):
    out = tmp_path / "steps.csv"
    skip = [] if model == "search" else ["--skip", "full-res,labels full,bf16"]
    run = subprocess.run([sys.executable, str(SCRIPT), "--model", model, "--shape", "16", "16", "16", "--threads", "1",
                          "--repeats", "1", "--out", str(out), *skip], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["configuration"] for r in rows] == expected
    for r in rows:
        assert r["shape"] == "16x16x16" and r["threads"] == "1" and int(r["steps"]) == 1
        assert float(r["median_s_per_step"]) > 0 and "torch" in r["hardware"] and float(r["load_1min_at_start"]) >= 0
        assert r["configuration"] in run.stdout



def test_shape_not_a_multiple_of_16_is_refused_before_timing(tmp_path):
    out = tmp_path / "steps.csv"
    run = subprocess.run([sys.executable, str(SCRIPT), "--model", "search", "--shape", "16", "24", "16",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert "--shape 16 24 16" in last and "multiple of 16" in last
    assert not out.exists()
