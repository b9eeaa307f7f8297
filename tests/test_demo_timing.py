"""The demo timing benchmark reads the README's own commands and times them with the machine's load."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import demo_timing  # noqa: E402


def test_the_readme_quick_start_commands_are_the_ones_timed():
    commands = demo_timing.readme_commands(REPO_ROOT / "README.md")
    assert commands[0].startswith("python -m monai.bundle run training --config_file configs/train.json")
    assert commands[1].startswith("python -m monai.bundle run inference")
    assert not any(c.startswith("pip") for c in commands)


def test_a_readme_without_commands_is_an_error(tmp_path):
    (tmp_path / "README.md").write_text("# no commands\n")
    with pytest.raises(ValueError, match="README.md: no ```bash block"):
        demo_timing.readme_commands(tmp_path / "README.md")


def test_commands_are_timed_with_the_load(tmp_path):
    rows = demo_timing.time_commands(["python -c 'import time; time.sleep(0.3)'"], tmp_path, tmp_path / "log.txt")
    assert rows[0]["exit_code"] == 0 and 0.3 <= rows[0]["seconds"] < 30
    assert rows[0]["load_1min_max"] >= rows[0]["load_1min_mean"] >= 0
    with pytest.raises(SystemExit, match="failed with exit code 3"):
        demo_timing.time_commands(["python -c 'raise SystemExit(3)'"], tmp_path, tmp_path / "log.txt")
