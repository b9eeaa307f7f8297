"""``kill -9`` during inference, for real: ``brainreg register`` processes killed at several points (while the
outputs are staged, and at seeded random times) never leave a partial or mixed output folder, and the next run
cleans up and writes a complete one.

The folder ``out`` first holds a complete registration A->B (and a file of the user's); every killed run
registers the other direction than the one ``out`` holds, so after each kill ``out`` must hold exactly the
A->B outputs or exactly the B->A ones, never a mix, and the user's file.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO_ROOT, bundle_env

RANDOM_KILLS = 5
MAIN = "import sys; from bundle.cli import main; sys.exit(main())"


def _blobs(path: Path, shift: float) -> Path:
    """A 32^3, 3 mm image of three Gaussian blobs, the whole pattern shifted by ``shift`` voxels."""
    grid = np.stack(np.meshgrid(*[np.arange(32.0)] * 3, indexing="ij"))
    image = np.zeros((32, 32, 32), np.float32)
    for centre in ((12, 14, 16), (20, 18, 12), (16, 22, 20)):
        image += np.exp(-(((grid - (np.array(centre) + shift)[:, None, None, None]) ** 2).sum(0)) / 18.0)
    nib.save(nib.Nifti1Image(image, np.diag([3.0, 3.0, 3.0, 1.0])), str(path))
    return path


def _start(moving: Path, fixed: Path, out: Path, tmp: Path) -> subprocess.Popen:
    env = dict(bundle_env(1), TMPDIR=str(tmp))
    # --itk: two more staged files (the ITK field and transform), so that staging lasts long enough to be hit
    args = ["register", moving, fixed, "--out", out, "--prealign", "none", "--device", "cpu", "--itk"]
    return subprocess.Popen([sys.executable, "-c", MAIN, *map(str, args)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]


def _images(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob("*.nii*"))}


def _kill_when(proc: subprocess.Popen, condition, delay: float = 0.0) -> bool:
    """SIGKILL ``proc`` ``delay`` s after ``condition()`` holds; ``False`` if it ended first."""
    while proc.poll() is None:
        if condition():
            time.sleep(delay)
            if proc.poll() is not None:
                break
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return True
        time.sleep(0.001)
    proc.communicate()
    return False


def _same_images(folder: Path, expected: dict[str, np.ndarray]) -> bool:
    got = _images(folder)
    return got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference_kill")
    (root / "tmp").mkdir()
    a, b = _blobs(root / "a.nii.gz", 0.0), _blobs(root / "b.nii.gz", 1.5)
    # what each direction gives when not killed (folders of their own); then A->B in ``out``
    start = time.monotonic()
    _finish(_start(b, a, root / "b_to_a", root / "tmp"))
    seconds = time.monotonic() - start
    _finish(_start(a, b, root / "a_to_b", root / "tmp"))
    complete = {"A->B": _images(root / "a_to_b"), "B->A": _images(root / "b_to_a")}
    assert complete["A->B"].keys() == complete["B->A"].keys()
    assert not all(np.array_equal(complete["A->B"][k], complete["B->A"][k]) for k in complete["A->B"]), \
        "A->B and B->A must differ for the test to tell them apart"
    out = root / "out"
    _finish(_start(a, b, out, root / "tmp"))
    (out / "notes.txt").write_text("the user's own file")

    def holds() -> str:
        if not out.is_dir():
            return "no folder"
        return next((d for d, images in complete.items() if _same_images(out, images)), "a mix")

    rng = random.Random(0)
    points = [("outputs being staged", lambda: (root / ".out.partial").exists(), 0.0)]
    points += [(f"random {i + 1}", lambda: True, rng.uniform(0.5, 1.2 * seconds)) for i in range(RANDOM_KILLS)]
    after_kills = []
    for name, condition, delay in points:
        held = holds()
        moving, fixed = (b, a) if held == "A->B" else (a, b)
        killed = _kill_when(_start(moving, fixed, out, root / "tmp"), condition, delay)
        after_kills.append({"point": name, "delay": round(delay, 2), "killed": killed, "before": held,
                            "after": holds(), "user_file": (out / "notes.txt").is_file()})
    print(f"one run {seconds:.1f} s; kills: {after_kills}")
    _finish(_start(b, a, out, root / "tmp"))
    return {"root": root, "out": out, "after_kills": after_kills, "new": complete["B->A"]}


def test_a_killed_inference_leaves_the_earlier_or_the_new_outputs_never_a_mix(killed_runs):
    after_kills = killed_runs["after_kills"]
    assert after_kills[0]["killed"], "the run ended before its outputs were staged: the staging kill point was missed"
    assert sum(k["killed"] for k in after_kills) >= 4, after_kills
    for kill in after_kills:
        assert kill["after"] in ("A->B", "B->A"), f"after the kill '{kill['point']}' the output folder holds {kill['after']}"
        assert kill["user_file"], f"after the kill '{kill['point']}' the user's own file is gone"
    assert after_kills[0]["after"] == after_kills[0]["before"], "a kill while staging must leave the earlier outputs"


def test_the_run_after_the_kills_cleans_up_and_writes_a_complete_folder(killed_runs):
    root, out = killed_runs["root"], killed_runs["out"]
    assert _same_images(out, killed_runs["new"])
    assert (out / "notes.txt").read_text() == "the user's own file"
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".out.")]
    assert not leftovers, f"staging or replaced folders left next to the outputs: {leftovers}"
    assert not list((root / "tmp").glob("brainreg_*")), "a killed run's work folder was not removed"
