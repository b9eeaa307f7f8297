"""Time the README's quick-start commands on a fresh clone, with the machine's load, into a CSV.

    python benchmarks/demo_timing.py [--out docs/results/demo_timing.csv] [--repo .]

The commands are read from the README's first ``bash`` block with more than ``pip install`` in it (those are skipped: the
environment running this script is used), then run one after the other in a fresh ``git clone`` of ``--repo``
(its committed state: no demo data, no trained model), each timed by wall clock. The 1-minute load average is
sampled every 2 s while each command runs: the CSV says how busy the machine was (on 2 cores, a load above 2
means the command shared them). One row per command, plus the hardware, the commit and the date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bundle.engines.training import hardware_description  # noqa: E402
from bundle.io.writers import write_csv  # noqa: E402


def readme_commands(readme: Path) -> list[str]:
    """The commands of the README's first ``bash`` block that has more than ``pip install`` steps, split at
    ``&&``, without the ``pip install`` steps."""
    blocks = re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S)
    for block in blocks:
        commands = [c.strip() for line in block.splitlines() if line.strip() for c in line.split("&&")]
        commands = [c for c in commands if not c.startswith("pip ")]
        if commands:
            return commands
    raise ValueError(f"{readme}: no ```bash block with the quick-start commands.")


class LoadSampler:
    """The 1-minute load average, sampled every ``interval`` s in a thread while a command runs."""

    def __init__(self, interval: float = 2.0) -> None:
        self.interval, self.samples, self._stop = interval, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.interval)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def time_commands(commands: list[str], cwd: Path, log: Path) -> list[dict]:
    rows = []
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "python":
            argv[0] = sys.executable
        start = time.monotonic()
        with LoadSampler() as load, open(log, "a") as out:
            out.write(f"$ {command}\n")
            out.flush()
            code = subprocess.call(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        seconds = time.monotonic() - start
        rows.append({"command": command, "seconds": round(seconds, 1), "exit_code": code,
                     "load_1min_mean": round(sum(load.samples) / len(load.samples), 2),
                     "load_1min_max": round(max(load.samples), 2)})
        print(f"{seconds:7.1f} s  (load {rows[-1]['load_1min_mean']}, max {rows[-1]['load_1min_max']})  {command}")
        if code != 0:
            raise SystemExit(f"error: '{command}' failed with exit code {code}; its output is in {log}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO_ROOT, help="repository to clone (its committed state)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "results" / "demo_timing.csv")
    args = parser.parse_args(argv)
    commands = readme_commands(args.repo / "README.md")
    commit = subprocess.check_output(["git", "-C", str(args.repo), "rev-parse", "--short", "HEAD"], text=True).strip()
    with tempfile.TemporaryDirectory(prefix="demo_timing_") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.check_call(["git", "clone", "--quiet", str(args.repo), str(clone)])
        log = args.out.with_suffix(".log")
        log.write_text(f"# {commit}: the README's commands in a fresh clone (benchmarks/demo_timing.py)\n")
        rows = time_commands(commands, clone, log)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    hardware = hardware_description()
    write_csv(args.out, [{**row, "commit": commit, "date": stamp, "hardware": hardware} for row in rows])
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
