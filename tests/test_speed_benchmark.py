"""Smoke test of benchmarks/speed.py on a tiny volume: every model and mode gets a row with positive numbers."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "speed.py"
MODELS = ("reg", "joint", "monai", "voxelmorph")
HAS_VXM = importlib.util.find_spec("voxelmorph") is not None


def _load_speed():
    spec = importlib.util.spec_from_file_location("speed_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_table_and_writes_csv(tmp_path):
    out_csv = tmp_path / "speed.csv"
    args = ["--device", "cpu", "--sizes", "16,16,16", "--models", *MODELS, "--warmup", "0", "--repeats", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--threads", "1", "--csv", str(out_csv)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| cpu |")]
    assert len(table) == 2 * len(MODELS)
    assert "| device | model | size | mode | params | conv GFLOP | ms/pair | pairs/s | CPU ms/pair | peak MB |" in result.stdout
    assert "<!-- 1-min load average:" in result.stdout and "<!-- torch " in result.stdout

    rows = list(csv.DictReader(out_csv.open()))
    assert {(r["model"], r["mode"]) for r in rows} == {(m, mode) for m in MODELS for mode in ("infer", "train")}
    for r in rows:
        assert r["device"] == "cpu" and r["size"] == "16x16x16" and r["threads"] == "1"
        if r["model"] == "voxelmorph" and not HAS_VXM:
            assert r["status"].startswith("error: ModuleNotFoundError: voxelmorph is not installed")
            continue
        assert r["status"] == "ok", r
        ms, rate, peak = float(r["ms_per_pair"]), float(r["pairs_per_s"]), float(r["peak_mb"])
        assert ms > 0 and float(r["cpu_ms_per_pair"]) > 0 and peak > 0 and int(r["params"]) > 100_000
        assert rate == pytest.approx(1000.0 / ms, rel=1e-2)
    by_case = {(r["model"], r["mode"]): r for r in rows}
    assert int(by_case["joint", "train"]["params"]) > int(by_case["reg", "train"]["params"])  # two decoders
    # our VM-2 U-Net at 16^3, multiply-adds by hand: encoder 2->16 @8^3, 16->32 @4^3, 32->32 @2^3, 32->32 @1^3;
    # decoder 32->32 @1^3, 64->32 @2^3, 64->32 @4^3, 48->32 @8^3, 34->32, 32->16, 16->16, flow 16->3 @16^3; k = 27
    macs = 27 * (512 * 16 * 2 + 64 * 32 * 16 + 8 * 32 * 32 + 32 * 32 + 32 * 32 + 8 * 32 * 64 + 64 * 32 * 64
                 + 512 * 32 * 48 + 4096 * (32 * 34 + 16 * 32 + 16 * 16 + 3 * 16))
    assert float(by_case["reg", "infer"]["conv_gflop"]) == pytest.approx(2 * macs / 1e9, rel=1e-3)


def test_bad_arguments_are_rejected_with_a_clear_message(capsys):
    speed = _load_speed()
    assert speed.parse_size("160,192,224") == (160, 192, 224)
    for bad in (["--sizes", "30,32,32"], ["--sizes", "32,32"], ["--repeats", "0"], ["--models", "unet"]):
        with pytest.raises(SystemExit) as exit_info:
            speed.parse_args(bad)
        assert exit_info.value.code == 2
    assert "multiples of 16" in capsys.readouterr().err
