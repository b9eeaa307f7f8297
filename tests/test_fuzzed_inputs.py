"""Property-based fuzzing (hypothesis) of everything the bundle reads from the user.

Targets: the datalist parser (:func:`bundle.io.load_pairs` / :func:`bundle.io.load_subjects`); image files
through the pre-processing of ``configs/inference.json`` (truncated, garbage, empty, wrong dimensions, NaN/Inf,
constant, huge headers, 4-D, odd orientations and spacings, other dtypes); moving label maps through the same
pre-processing; checkpoints (:func:`bundle.engines.load_checkpoint` / :func:`bundle.engines.load_weights` and the
CLI's own reading); ``brainreg`` options in-process, and a few real ``brainreg`` runs as subprocesses.

Every case must end in a valid result or a clear error: a ``ValueError`` / ``FileNotFoundError`` in the
exception's chain (what :func:`bundle.errors.input_error` reports, and ``brainreg`` prints as its last line) whose
one-line message names the offending file. Inputs that the generator knows to be garbage must end in an error.

The runs are derandomised (the same cases every time) and sized for about a minute on 2 busy cores; the number
of cases tried per target is printed (``-s``) and shown in the terminal summary.
"""

from __future__ import annotations

import contextlib
import difflib
import gzip
import inspect
import io
import json
import math
import pickle
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from monai.bundle import ConfigParser
from nibabel.spatialimages import HeaderDataError

from bundle import cli
from bundle.engines import load_weights
from bundle.errors import input_error
from bundle.io import load_pairs, load_subjects
from conftest import CONFIGS, bundle_env

CASES: Counter = Counter()  # cases tried per target, reported at the end of the session

# numpy on the NaN / singular affines of fuzzed headers (nibabel, MONAI): expected
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def fuzz(max_examples: int):
    """Reproducible (derandomised, no example database) hypothesis settings without time limits."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


class _CaseReport:
    """Adds the cases tried per target to pytest's terminal summary."""

    def pytest_terminal_summary(self, terminalreporter):
        if CASES:
            terminalreporter.write_sep("-", "fuzzed input cases tried")
            for target, count in CASES.items():
                terminalreporter.write_line(f"{target}: {count}")
            terminalreporter.write_line(f"total: {sum(CASES.values())}")


@pytest.fixture(scope="module", autouse=True)
def case_report(request):
    if not request.config.pluginmanager.has_plugin("fuzzed-input-cases"):
        request.config.pluginmanager.register(_CaseReport(), "fuzzed-input-cases")
    yield


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the cases are tiny, and on 2 busy cores a second thread mostly waits (every parallel
    region waits for the descheduled one: a checkpoint's finiteness check took 25x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tried(target: str, start: float) -> None:
    print(f"\n{target}: {CASES[target]} cases in {time.monotonic() - start:.1f} s")


def _chain(error: BaseException) -> str:
    lines, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        lines.append(f"{type(error).__name__}: {str(error)[:400]}")
        error = error.__cause__ or error.__context__
    return "\n  <- ".join(lines)


def assert_clear(error: BaseException, *names: str) -> str:
    """``error`` carries a ValueError/FileNotFoundError (:func:`input_error`) whose one-line message names one of
    ``names`` (file names); returns that message."""
    cause = input_error(error)
    assert cause is not None, f"unclear error (no ValueError/FileNotFoundError in the chain):\n  {_chain(error)}"
    message = str(cause)
    assert any(n in message for n in names), f"the message names none of {names}:\n  {_chain(error)}"
    assert "\n" not in message.strip(), f"the message is not one line:\n{message}"
    return message


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """``(weight, strategy)`` pairs drawn in proportion (``st.one_of`` draws its branches about equally however
    often one is repeated)."""
    return st.sampled_from([s for weight, s in choices for _ in range(weight)]).flatmap(lambda s: s)


def _fresh_folder(root: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=root))


# ============================================================================================= datalists

_FILE_NAMES = ("img0.nii.gz", "img1.nii.gz", "sub/img2.nii.gz", "img0_seg.nii.gz")
_PATH_KEYS = ("moving", "fixed", "moving_label", "fixed_label", "moving_tumour", "fixed_tumour", "image", "label", "tumour")

_junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=6))
_good_ref = weighted(
    (6, st.sampled_from(_FILE_NAMES)),  # relative to the datalist
    (1, st.builds(lambda n: "ABS:" + n, st.sampled_from(_FILE_NAMES))),  # made absolute by _absolute
    (1, st.lists(st.sampled_from(_FILE_NAMES), min_size=1, max_size=3)),  # channels
)
_bad_ref = st.one_of(
    st.sampled_from(("absent.nii.gz", "sub/absent.nii.gz", "", ".", "sub", "~/absent.nii.gz", "img0.nii.gz\x00x")),
    st.just("x" * 300 + ".nii.gz"),  # longer than a file name may be
    st.just([]),
    st.lists(st.lists(st.sampled_from(_FILE_NAMES), max_size=2), min_size=1, max_size=2),  # nested: not a path
    _junk,
    st.dictionaries(st.text(max_size=3), _junk, max_size=2),
)
_MUTATIONS = ("bad_path", "bad_path", "drop_key", "extra_key", "junk_entry", "empty_section", "junk_section",
              "junk_pairing", "bad_atlas", "junk_document")


@st.composite
def datalists(draw):
    """A valid datalist (explicit pairs, or subjects for the ``atlas`` / ``all`` pairings), then 0-2 mutations:
    bad paths (absent, empty, too long, nested lists, wrong types), missing or extra keys, junk entries, sections,
    pairings, atlas or document."""
    pairing = draw(st.sampled_from((None, None, "explicit", "atlas", "all")))
    keys = ("moving", "fixed") if pairing in (None, "explicit") else ("image",)
    optional = ("moving_label", "fixed_label", "moving_tumour") if len(keys) == 2 else ("label", "tumour")
    entries = []
    for i in range(draw(st.integers(1, 3))):
        entry = {k: draw(_good_ref) for k in keys + tuple(k for k in optional if draw(st.booleans()))}
        if draw(st.booleans()):
            entry["name"] = draw(st.one_of(st.text(max_size=4), st.integers(0, 9)))
        entries.append(entry)
    document = {"training": entries, "testing": [dict(e) for e in entries]}
    if pairing is not None:
        document["pairing"] = pairing
    if pairing == "atlas":
        document["atlas"] = {"image": draw(_good_ref)}
    for _ in range(draw(st.sampled_from((0, 0, 1, 1, 2)))):
        mutation = draw(st.sampled_from(_MUTATIONS))
        if not isinstance(document, dict):
            break
        section = draw(st.sampled_from(("training", "testing")))
        listed = document.get(section)
        entry = listed[draw(st.integers(0, len(listed) - 1))] if isinstance(listed, list) and listed else None
        if mutation == "bad_path" and isinstance(entry, dict):
            entry[draw(st.sampled_from(sorted(k for k in entry if k in _PATH_KEYS) or ["image"]))] = draw(_bad_ref)
        elif mutation == "drop_key" and isinstance(entry, dict) and entry:
            del entry[draw(st.sampled_from(sorted(entry)))]
        elif mutation == "extra_key" and isinstance(entry, dict):
            entry[draw(st.sampled_from(_PATH_KEYS + ("extra",)))] = draw(st.one_of(_good_ref, _bad_ref))
        elif mutation == "junk_entry" and entry is not None:
            listed[listed.index(entry)] = draw(st.one_of(_junk, st.lists(_junk, max_size=2)))
        elif mutation == "empty_section":
            document[section] = []
        elif mutation == "junk_section":
            document[section] = draw(st.one_of(_junk, st.dictionaries(st.text(max_size=3), _junk, max_size=2)))
        elif mutation == "junk_pairing":
            document["pairing"] = draw(st.one_of(st.just("pairs"), _junk))
        elif mutation == "bad_atlas":
            document["atlas"] = draw(st.one_of(_junk, st.just({}), st.fixed_dictionaries({"image": _bad_ref})))
        elif mutation == "junk_document":
            document = draw(st.one_of(_junk, st.lists(_junk, max_size=2)))
    return document


def _absolute(value, folder: Path):
    """``value`` with its ``"ABS:<name>"`` strings made absolute paths in ``folder``."""
    if isinstance(value, str) and value.startswith("ABS:"):
        return str(folder / value[4:])
    if isinstance(value, list):
        return [_absolute(v, folder) for v in value]
    if isinstance(value, dict):
        return {k: _absolute(v, folder) for k, v in value.items()}
    return value


def _datalist_bytes(document, encoding: str) -> bytes:
    """The datalist file: ``document`` as JSON, truncated JSON, or not JSON at all."""
    text = json.dumps(document)
    if encoding == "json":
        return text.encode()
    if encoding == "truncated":
        return text[: max(0, len(text) // 2)].encode()
    if encoding == "latin1":  # not UTF-8
        return ("{\"testing\": [{\"moving\": \"caf\xe9.nii.gz\"}]}").encode("latin-1")
    if encoding == "binary":
        return bytes(range(256)) * 4
    if encoding == "deep":
        return b"[" * 100_000 + b"]" * 100_000
    return b""


def _check_pairs(pairs, keys=("moving", "fixed")) -> None:
    """A valid parse: non-empty, named, every path an existing absolute file (or a flat list of them)."""
    assert isinstance(pairs, list) and pairs
    for pair in pairs:
        assert all(k in pair for k in keys) and isinstance(pair["name"], str), pair
        for key in _PATH_KEYS:
            if key not in pair:
                continue
            files = pair[key] if isinstance(pair[key], list) else [pair[key]]
            assert files and all(isinstance(f, str) and Path(f).is_absolute() and Path(f).is_file() for f in files), (
                f"{key}: {pair[key]!r} is not an existing file or a flat list of them"
            )


_EXPLICIT = {"encoding": "json", "where": "here", "reader": "pairs", "section": "testing", "pairing": None}


def test_datalists(tmp_path_factory):
    root = tmp_path_factory.mktemp("datalists")
    start = time.monotonic()

    @fuzz(330)
    @given(
        document=datalists(),
        encoding=st.sampled_from(("json",) * 8 + ("truncated", "latin1", "binary", "deep", "empty")),
        where=st.sampled_from(("here",) * 12 + ("absent", "folder", "long")),
        reader=st.sampled_from(("pairs", "pairs", "subjects")),
        section=st.sampled_from(("training", "testing") * 3 + ("validation",)),
        pairing=st.sampled_from((None,) * 6 + ("explicit", "atlas", "all", "pairs")),
    )
    @example(document={"testing": [{"moving": [["img0.nii.gz"]], "fixed": "img1.nii.gz"}]}, **_EXPLICIT)  # nested list
    @example(document={"testing": [{"image": [["img0.nii.gz"]]}]}, **{**_EXPLICIT, "reader": "subjects"})
    @example(document={"testing": [{"moving": "x" * 300, "fixed": "img1.nii.gz"}]}, **_EXPLICIT)  # name too long
    @example(document={}, **{**_EXPLICIT, "encoding": "latin1"})  # UnicodeDecodeError without the file name
    @example(document={}, **{**_EXPLICIT, "encoding": "deep"})  # RecursionError
    @example(document={}, **{**_EXPLICIT, "where": "long"})  # OSError: File name too long
    def check(document, encoding, where, reader, section, pairing):
        CASES["datalist"] += 1
        folder = _fresh_folder(root)
        for name in _FILE_NAMES:
            (folder / name).parent.mkdir(exist_ok=True)
            (folder / name).write_bytes(b"")
        path = folder / {"here": "datalist.json", "absent": "absent.json", "folder": "sub", "long": "d" * 300 + ".json"}[where]
        if where == "here":
            path.write_bytes(_datalist_bytes(_absolute(document, folder), encoding))
        try:
            if reader == "subjects":
                result = load_subjects(path, section)
            else:
                result = load_pairs(path, section, pairing)
        except Exception as e:
            message = assert_clear(e, path.name)
            assert not isinstance(e, FileNotFoundError) or "not found" in message or "cannot" in message
            return
        assert where == "here" and encoding == "json", f"garbage datalist accepted: {result}"
        _check_pairs(result, ("image",) if reader == "subjects" else ("moving", "fixed"))

    check()
    _tried("datalist", start)


# ============================================================================================= images

_KINDS = ("array",) * 24 + ("truncated", "garbage", "empty", "gzip_garbage", "huge_dims", "short_dims", "wrong_suffix",
                            "folder", "uncompressed")
_DTYPES = ("float32", "float64", "int16", "uint8", "complex64", "int8", "uint16", "int32", "uint64", "float32")


def image_spec(kind="array", shape=(12, 10, 8), dtype="float32", content="random", seed=0, spacing=(2.0, 2.0, 2.0),
               permutation=(0, 1, 2), angles=None, bad_affine=None, sform_code=1, qform_code=1, slope=None,
               extension=0, cut=0.5, noise=b"") -> dict:
    """A recipe for one image file (the array is made from ``seed`` when written)."""
    return dict(kind=kind, shape=tuple(shape), dtype=dtype, content=content, seed=seed, spacing=tuple(spacing),
                permutation=tuple(permutation), angles=angles, bad_affine=bad_affine, sform_code=sform_code,
                qform_code=qform_code, slope=slope, extension=extension, cut=cut, noise=noise)


@st.composite
def image_specs(draw):
    """Image recipes: wrong dimensions (0-size axes, 1-D, 2-D, 4-D with trailing singleton or not, 5-D), dtypes,
    NaN/Inf, constant and huge values, spacings (anisotropic, negative, tiny, zero, NaN, absurd), axis permutations
    and oblique rotations, sform/qform codes, scale slopes, large header extensions, and broken files."""
    ndim = draw(st.sampled_from((3,) * 8 + (4, 4, 2, 1, 5)))
    size = st.sampled_from((0, 1) + tuple(range(2, 11)) * 5)
    shape = tuple(draw(st.lists(size, min_size=min(ndim, 3), max_size=min(ndim, 3))))
    shape += {4: (draw(st.sampled_from((1, 1, 2, 3))),), 5: (1, 3)}.get(ndim, ())
    return image_spec(
        kind=draw(st.sampled_from(_KINDS)),
        shape=shape,
        dtype=draw(st.sampled_from(_DTYPES)),
        content=draw(st.sampled_from(("random",) * 9 + ("constant", "nan", "inf", "huge"))),
        seed=draw(st.integers(0, 2**16)),
        spacing=draw(st.lists(weighted((6, st.floats(0.3, 12.0)), (3, st.floats(-12.0, -0.3)), (1, st.just(1e-4))),
                              min_size=3, max_size=3)),
        permutation=draw(st.permutations(range(3))),
        angles=draw(st.one_of(st.none(), st.lists(st.floats(-math.pi, math.pi), min_size=3, max_size=3))),
        bad_affine=draw(st.sampled_from((None,) * 12 + ("zero", "nan", "inf", "absurd"))),
        sform_code=draw(st.sampled_from((1, 1, 2, 4, 0))),
        qform_code=draw(st.sampled_from((1, 1, 0))),
        slope=draw(st.sampled_from((None,) * 8 + (0.0, 2.5, -1.0, 1e38, math.inf, math.nan))),
        extension=draw(st.sampled_from((0, 0, 0, 1000, 500_000))),  # a huge header
        cut=draw(st.floats(0.05, 0.95)),
        noise=draw(st.binary(max_size=400)),
    )


def is_garbage(spec: dict) -> bool:
    """Whether the pipeline must reject the image whatever its partner (an error, not a result)."""
    shape, content = spec["shape"], spec["content"]
    floating = spec["dtype"].startswith("float")
    return (
        spec["kind"] not in ("array", "uncompressed")
        or 0 in shape
        or len(shape) in (1, 2, 5)
        or (len(shape) == 4 and shape[3] > 1)  # channels: the network takes one
        or math.prod(shape[:3]) == 1  # one voxel: constant
        or spec["dtype"] == "complex64"
        or content == "constant"
        or (content in ("nan", "inf") and floating)
        or (content == "huge" and spec["dtype"] == "float64")  # beyond float32
        # a broken sform; nibabel falls back on the header's pixdim (0 -> 1) when neither sform nor qform is set
        or (spec["bad_affine"] in ("zero", "nan", "inf") and spec["sform_code"] > 0)
    )


def spec_affine(spec: dict) -> np.ndarray:
    """The voxel-to-world matrix of a recipe: its image's centre near the world origin so that a pair overlaps."""
    spacing = list(spec["spacing"])
    bad = spec["bad_affine"]
    if bad is not None:
        spacing[spec["seed"] % 3] = {"zero": 0.0, "nan": math.nan, "inf": math.inf, "absurd": 1e4 * 10 ** (spec["seed"] % 27)}[bad]
    rotation = np.eye(3)[list(spec["permutation"])]
    for axis, angle in enumerate(spec["angles"] or ()):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rotation = r @ rotation
    affine = np.eye(4)
    with np.errstate(all="ignore"):
        affine[:3, :3] = rotation @ np.diag(spacing)
        affine[:3, 3] = -affine[:3, :3] @ np.full(3, 5.0)
    return affine


def spec_array(spec: dict) -> np.ndarray:
    shape, dtype, content = spec["shape"], spec["dtype"], spec["content"]
    rng = np.random.default_rng(spec["seed"])
    values = rng.random(shape) * 100
    if content == "constant":
        values = np.full(shape, 7.0)
    elif content == "huge":
        values = values * (1e300 if dtype == "float64" else 3e36)
    array = values.astype(dtype) if dtype != "complex64" else (values + 1j * values).astype(np.complex64)
    if content in ("nan", "inf") and np.issubdtype(array.dtype, np.floating) and array.size:
        flat = array.reshape(-1)
        flat[rng.integers(0, flat.size, size=min(3, flat.size))] = np.nan if content == "nan" else -np.inf
    return array


def _nifti_bytes(spec: dict, array: np.ndarray | None = None) -> bytes:
    """Uncompressed NIfTI-1 bytes of a recipe, its affine in the header as is (even singular or NaN)."""
    array = spec_array(spec) if array is None else array
    affine = spec_affine(spec)
    header = nib.Nifti1Header()
    header.set_data_dtype(array.dtype)
    header.set_data_shape(array.shape)
    with np.errstate(all="ignore"):
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    with contextlib.suppress(HeaderDataError):  # NaN / inf: the default pixdim stays (the sform keeps the bad values)
        header.set_zooms(tuple(zooms[: min(array.ndim, 3)]) + (1.0,) * max(0, array.ndim - 3))
    header.set_sform(affine, code=spec["sform_code"])
    try:
        header.set_qform(affine, code=spec["qform_code"])
    except (HeaderDataError, np.linalg.LinAlgError):  # a singular or non-finite affine has no quaternion
        header.set_qform(None, code=0)
    if spec["extension"]:
        header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * spec["extension"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = bytearray(nib.Nifti1Image(array, None, header=header).to_bytes())
    if spec["slope"] is not None:  # scl_slope, scl_inter as stored (nibabel's writer would reset them)
        struct.pack_into("<2f", raw, 112, spec["slope"], 0.0)
    dims = list(struct.unpack_from("<8h", raw, 40))
    if spec["kind"] == "huge_dims":  # 32767**4 voxels: no allocation can succeed, whatever the overcommit policy
        dims[0], dims[1:5] = max(dims[0], 4), [32767] * 4
    elif spec["kind"] == "short_dims":  # the header claims more voxels than the file holds
        dims[0], dims[1:4] = max(dims[0], 3), [max(d, 1) + 20 for d in dims[1:4]]
    struct.pack_into("<8h", raw, 40, *dims)
    return bytes(raw)


def write_image(spec: dict, folder: Path, stem: str = "image", array: np.ndarray | None = None) -> Path:
    """Write the file of a recipe into ``folder``; its path."""
    kind = spec["kind"]
    suffix = {"wrong_suffix": ".txt", "uncompressed": ".nii"}.get(kind, ".nii.gz")
    path = folder / f"{stem}_{kind}{suffix}"
    if kind == "folder":
        path.mkdir()
        return path
    if kind == "garbage":
        data = spec["noise"]
    elif kind == "empty":
        data = b""
    elif kind == "gzip_garbage":
        data = gzip.compress(spec["noise"] + b"\x00" * 400)
    elif kind in ("uncompressed", "wrong_suffix"):
        data = _nifti_bytes(spec, array)
    else:
        data = gzip.compress(_nifti_bytes(spec, array), compresslevel=1)
        if kind == "truncated":
            data = data[: max(1, int(len(data) * spec["cut"]))]
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def inference_parser():
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    return parser


def _preprocessing(parser: ConfigParser, prealign: str):
    """``preprocessing`` of configs/inference.json with the given pre-alignment."""
    parser = ConfigParser(parser.get())
    parser.update({"prealign": prealign})
    return parser.get_parsed_content("preprocessing", instantiate=True)


@pytest.fixture(scope="module")
def good_image(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    path = folder / "good.nii.gz"
    array = np.random.default_rng(0).random((12, 10, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path


def _check_network_input(item, pixdim, channels: int = 1) -> None:
    """A valid pre-processed image: finite, ``channels`` x 3-D, divisible by 16, on the RAS grid of ``pixdim``."""
    assert item.shape[0] == channels and item.ndim == 4, tuple(item.shape)
    assert all(s % 16 == 0 and s > 0 for s in item.shape[1:]), tuple(item.shape)
    assert torch.isfinite(item.as_tensor()).all(), "non-finite values"
    affine = item.affine.numpy()
    assert np.isfinite(affine).all(), affine
    np.testing.assert_allclose(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)), pixdim, rtol=1e-3)
    assert nib.aff2axcodes(affine) == ("R", "A", "S"), nib.aff2axcodes(affine)


def _run_quietly(transform, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transform(data)


def test_images(tmp_path_factory, inference_parser, good_image):
    root = tmp_path_factory.mktemp("images")
    preprocessing = _preprocessing(inference_parser, "none")  # the ITK pre-alignment: test_images_prealigned
    pixdim = [float(p) for p in inference_parser.get_parsed_content("pixdim")]
    start = time.monotonic()

    @fuzz(330)
    @given(spec=image_specs(), role=st.sampled_from(("moving", "fixed", "both")))
    @example(spec=image_spec(kind="truncated"), role="moving")  # EOFError without the file name
    @example(spec=image_spec(kind="garbage", noise=b"hello"), role="fixed")  # nibabel's ImageFileError
    @example(spec=image_spec(kind="wrong_suffix"), role="moving")  # MONAI: no reader, a RuntimeError
    @example(spec=image_spec(kind="huge_dims"), role="moving")  # "Expected ... bytes" OSError
    @example(spec=image_spec(dtype="complex64"), role="moving")  # imaginary part dropped silently
    @example(spec=image_spec(bad_affine="zero"), role="fixed")  # singular sform: torch _LinAlgError
    @example(spec=image_spec(bad_affine="nan"), role="moving")  # NaN sform: Orientationd's "Unable to find out axis"
    @example(spec=image_spec(bad_affine="absurd", seed=6), role="fixed")  # 1e10 mm voxels: a 6e11-voxel grid
    @example(spec=image_spec(shape=(12, 10)), role="both")  # 2-D pair: PreAlignd's error named no file
    @example(spec=image_spec(shape=(1, 2), permutation=(0, 2, 1)), role="both")  # 2-D, axes swapped: singular 2-D block
    @example(spec=image_spec(shape=(12, 10, 8, 3)), role="both")  # 3 channels each: the network's conv error
    @example(spec=image_spec(shape=(12, 10, 8, 1), extension=500_000), role="fixed")  # valid: trailing singleton
    def check(spec, role):
        CASES["image"] += 1
        path = write_image(spec, _fresh_folder(root))
        data = {"moving": str(good_image), "fixed": str(good_image)}
        for key in ("moving", "fixed") if role == "both" else (role,):
            data[key] = str(path)
        try:
            out = _run_quietly(preprocessing, data)
        except Exception as e:
            assert_clear(e, path.name)
            return
        assert not is_garbage(spec), f"garbage accepted without an error: {spec}"
        for key in ("moving", "fixed"):
            _check_network_input(out[key], pixdim)

    check()
    _tried("image", start)


def test_images_prealigned(tmp_path_factory, inference_parser, good_image):
    """The default ITK affine pre-alignment on odd geometry (spacings, flips, oblique axes) of valid images."""
    root = tmp_path_factory.mktemp("prealigned")
    preprocessing = _preprocessing(inference_parser, "affine")
    pixdim = [float(p) for p in inference_parser.get_parsed_content("pixdim")]
    start = time.monotonic()

    @fuzz(2)
    @given(spec=image_specs().filter(lambda s: s["kind"] == "array" and not is_garbage(s) and len(s["shape"]) == 3),
           role=st.sampled_from(("moving", "fixed")))
    @example(spec=image_spec(shape=(2, 2, 2), spacing=(1.0, 1e-4, 1.0)), role="moving")  # ITK: bin larger than image
    @example(spec=image_spec(shape=(12, 10, 1)), role="moving")  # one slice: a 2-D ITK image, TemplateTypeError
    def check(spec, role):
        CASES["image (affine pre-alignment)"] += 1
        path = write_image(spec, _fresh_folder(root))
        data = {"moving": str(good_image), "fixed": str(good_image), role: str(path)}
        try:
            out = _run_quietly(preprocessing, data)
        except Exception as e:
            assert_clear(e, path.name)
            return
        for key in ("moving", "fixed"):
            _check_network_input(out[key], pixdim)
        assert torch.isfinite(out["prealign_matrix"]).all()

    check()
    _tried("image (affine pre-alignment)", start)


# ============================================================================================= label maps

@st.composite
def label_specs(draw):
    """A moving label map: integer or float dtype, label values, fractional, negative, NaN or huge values, the
    image's shape or another one, an extra channel axis."""
    shape = draw(st.sampled_from(((12, 10, 8),) * 4 + ((12, 10, 9), (8, 8, 8), (12, 10, 8, 1), (12, 10, 8, 2), (12, 10))))
    dtype = draw(st.sampled_from(("uint8", "int16", "int32", "uint16", "float32", "float64")))
    content = draw(st.sampled_from(("labels",) * 4 + ("fractional", "negative", "nan", "large")))
    return {"shape": shape, "dtype": dtype, "content": content, "seed": draw(st.integers(0, 2**16)),
            "high": draw(st.sampled_from((2, 5, 35, 255, 2**15 - 1)))}


def label_array(spec: dict) -> np.ndarray:
    rng = np.random.default_rng(spec["seed"])
    values = rng.integers(0, spec["high"] + 1, spec["shape"]).astype(np.float64)
    floating = spec["dtype"].startswith("float")
    if spec["content"] == "fractional" and floating:
        values += 0.25
    elif spec["content"] == "negative" and spec["dtype"].startswith("int"):
        values -= spec["high"]
    elif spec["content"] == "nan" and floating:
        values.reshape(-1)[0] = np.nan
    elif spec["content"] == "large":  # label ids beyond float32's exact integers (2**24), or beyond int64
        values *= {"float32": 1e20, "float64": 1e20, "int32": 2**20, "uint16": 1, "int16": 1, "uint8": 1}[spec["dtype"]]
    return values.astype(spec["dtype"])


def test_label_maps(tmp_path_factory, inference_parser, good_image):
    root = tmp_path_factory.mktemp("labels")
    preprocessing = _preprocessing(inference_parser, "none")
    start = time.monotonic()

    @fuzz(100)
    @given(spec=label_specs())
    @example(spec={"shape": (12, 10, 8), "dtype": "int32", "content": "large", "seed": 0, "high": 35})  # ids > 2**24
    @example(spec={"shape": (12, 10, 8), "dtype": "float32", "content": "large", "seed": 0, "high": 5})  # > int64
    @example(spec={"shape": (12, 10, 8), "dtype": "float32", "content": "fractional", "seed": 0, "high": 5})
    def check(spec):
        CASES["label map"] += 1
        array = label_array(spec)
        path = write_image(image_spec(shape=spec["shape"], dtype=spec["dtype"]), _fresh_folder(root), "label", array)
        data = {"moving": str(good_image), "fixed": str(good_image), "moving_label": str(path)}
        try:
            out = _run_quietly(preprocessing, data)
        except Exception as e:
            assert_clear(e, path.name)
            return
        floating = spec["dtype"].startswith("float")
        assert spec["shape"][:3] == (12, 10, 8) and spec["shape"][3:] in ((), (1,)), f"wrong shape accepted: {spec}"
        assert not (floating and spec["content"] in ("fractional", "nan")), f"non-integer labels accepted: {spec}"
        label = out["moving_label"].as_tensor()  # float after Spacingd, integral values
        assert label.shape == out["moving"].shape and torch.equal(label, label.round()), (label.shape, label.dtype)
        found, given_values = set(np.unique(label.numpy()).tolist()), set(np.unique(array).tolist()) | {0}
        assert found <= given_values, f"label values changed: {sorted(found - given_values)[:5]} not in the file"

    check()
    _tried("label map", start)


# ============================================================================================= checkpoints

@pytest.fixture(scope="module")
def network_and_state(inference_parser):
    torch.manual_seed(0)
    network = ConfigParser(inference_parser.get()).get_parsed_content("network_def", instantiate=True)
    return network, {k: v.clone() for k, v in network.state_dict().items()}


class _Opaque:
    """A class that ``torch.load(weights_only=True)`` refuses to unpickle."""


@st.composite
def checkpoint_specs(draw):
    """A checkpoint recipe: valid (plain, under ``network`` / ``model``, DDP's ``module.`` prefix), garbage, empty or
    truncated bytes, a plain pickle, an object torch refuses, no dict, other keys, int keys, a wrong shape, a missing
    tensor, NaN/Inf weights, a folder."""
    kind = draw(st.sampled_from(("valid",) * 3 + ("garbage", "empty", "truncated", "not_a_dict", "other_keys", "int_keys",
                                                  "wrong_shape", "missing_key", "non_finite", "opaque", "folder", "pickle")))
    return {"kind": kind, "wrap": draw(st.sampled_from(("plain", "network", "model", "module"))),
            "index": draw(st.integers(0, 10**6)), "noise": draw(st.binary(max_size=200)), "cut": draw(st.floats(0.01, 0.99)),
            "keys": draw(st.lists(st.one_of(st.text(max_size=8), st.integers(-2, 2)), max_size=3)),
            "value": draw(st.sampled_from(("tensor", "int", "text", "dict", "nan")))}


def write_checkpoint(spec: dict, state: dict, folder: Path) -> Path:
    """Write the checkpoint of a recipe (``state``: the network's valid state dict) into ``folder``; its path."""
    kind = spec["kind"]
    path = folder / f"ckpt_{kind}.pt"
    name = sorted(state)[spec["index"] % len(state)]
    value = {"tensor": torch.ones(2), "int": 3, "text": "w", "dict": {"a": torch.zeros(1)}, "nan": torch.tensor([math.nan])}
    content = dict(state)
    if kind == "folder":
        path.mkdir()
        return path
    if kind in ("garbage", "empty"):
        path.write_bytes(spec["noise"] if kind == "garbage" else b"")
        return path
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"network": {name: 1}}))
        return path
    if kind == "not_a_dict":
        content = [state[name]] if spec["index"] % 2 else state[name]
    elif kind == "other_keys":
        content = {k: value[spec["value"]] for k in spec["keys"]}
    elif kind == "int_keys":
        content = {spec["index"] % 7: state[name], **{k: v for k, v in state.items() if k != name}}
    elif kind == "wrong_shape":
        content[name] = torch.zeros(*state[name].shape, 2)
    elif kind == "missing_key":
        del content[name]
    elif kind == "non_finite":
        content[name] = state[name].clone()
        content[name].reshape(-1)[0] = math.nan if spec["index"] % 2 else math.inf
    elif kind == "opaque":
        content = {"network": state, "extra": _Opaque()}
    if isinstance(content, dict) and kind != "other_keys":
        wrap = spec["wrap"]
        if wrap == "module":
            content = {f"module.{k}" if isinstance(k, str) else k: v for k, v in content.items()}
        elif wrap != "plain":
            content = {wrap: content, "checkpointer": {"saved": []}}
    buffer = io.BytesIO()
    torch.save(content, buffer)
    data = buffer.getvalue()
    path.write_bytes(data[: max(1, int(len(data) * spec["cut"]))] if kind == "truncated" else data)
    return path


def test_checkpoints(tmp_path_factory, network_and_state):
    root = tmp_path_factory.mktemp("checkpoints")
    network, state = network_and_state
    start = time.monotonic()

    @fuzz(100)
    @given(spec=checkpoint_specs())
    @example(spec={"kind": "int_keys", "wrap": "plain", "index": 0, "noise": b"", "cut": 0.5, "keys": [], "value": "int"})
    @example(spec={"kind": "non_finite", "wrap": "network", "index": 1, "noise": b"", "cut": 0.5, "keys": [], "value": "int"})
    @example(spec={"kind": "opaque", "wrap": "plain", "index": 0, "noise": b"", "cut": 0.5, "keys": [], "value": "int"})
    def check(spec):
        CASES["checkpoint"] += 1
        path = write_checkpoint(spec, state, _fresh_folder(root))
        network.load_state_dict(state)
        try:
            _, cli_state = cli._checkpoint(path, None)  # brainreg reads the checkpoint itself to pick the configs
            cli.is_registration_only(cli_state)
            loaded = load_weights(network, path)
        except Exception as e:
            assert_clear(e, path.name)
            return
        assert spec["kind"] == "valid", f"unusable checkpoint accepted: {spec}"
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())

    check()
    _tried("checkpoint", start)


# ============================================================================================= CLI options

@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, network_and_state):
    folder = tmp_path_factory.mktemp("cli")
    image = folder / "image.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 16), dtype=np.float32), np.eye(4)), str(image))
    ckpt = folder / "model.pt"
    torch.save({"network": network_and_state[1]}, ckpt)
    return folder, image, ckpt


def brainreg(*argv) -> tuple[int, str]:
    """``brainreg *argv`` in-process: exit status and stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, err.getvalue()


def _error_line(code: int, err: str, *names: str) -> str:
    """Exit status 2 and one ``brainreg: error:`` line, last, without a traceback, naming one of ``names``."""
    lines = err.strip().splitlines()
    assert code == 2 and lines and lines[-1].startswith("brainreg: error: "), f"exit {code}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert any(n in lines[-1] for n in names), f"the error names none of {names}: {lines[-1]}"
    return lines[-1]


def _register_ids(root: Path) -> list[str]:
    """What ``brainreg register --<name>`` accepts: its own options and the ids of inference.json."""
    options = [n for n in inspect.signature(cli.register).parameters if n != "overrides"]
    return options + [k for k in cli.read_config(root, ["inference.json"]).get() if not k.startswith("_")]


_LETTERS = "abcdefghijklmnopqrstuvwxyz_-"


@st.composite
def misspellings(draw, names: list[str]):
    """One edit (deletion, insertion, replacement, transposition) of an option or config id of 3+ letters."""
    name = draw(st.sampled_from(sorted(n for n in names if len(n) >= 3)))
    at = draw(st.integers(0, len(name) - 1))
    how = draw(st.sampled_from(("delete", "insert", "replace", "swap")))
    letter = draw(st.sampled_from(_LETTERS[:-2]))
    if how == "delete":
        typo = name[:at] + name[at + 1 :]
    elif how == "insert":
        typo = name[:at] + letter + name[at:]
    elif how == "replace":
        typo = name[:at] + letter + name[at + 1 :]
    else:
        typo = name[:at] + name[at + 1 : at + 2] + name[at] + name[at + 2 :] if at + 1 < len(name) else name + letter
    return typo if typo[:1].isalpha() else "x" + typo


def test_cli_options(cli_inputs):
    folder, image, ckpt = cli_inputs
    root = cli.find_bundle_root()
    ids = _register_ids(root)
    out = folder / "out"

    @fuzz(60)
    @given(typo=misspellings(ids))
    @example(typo="moving-lable")
    def misspelt(typo):
        name = typo.replace("-", "_")  # fire's spelling
        assume(name not in ids and not (name.startswith("no") and name[2:] in ids))  # not a valid option after all
        CASES["cli option (misspelt)"] += 1
        code, err = brainreg("register", image, image, "--out", out, "--model", ckpt, f"--{typo}", "1")
        line = _error_line(code, err, f"--{name}")
        assert f"unknown option(s) --{name} (did you mean --" in line, line
        close = difflib.get_close_matches(name, ids, n=3)
        assert all(f"--{c}" in line for c in close), (close, line)

    @fuzz(60)
    @given(option=st.sampled_from(("device", "prealign")),
           value=st.one_of(st.sampled_from(("cpu", "cuda", "cuda:0", "gpu", "none", "rigid", "affine", "Affine", "bspline")),
                           st.text("abcdefghijklmnopqrstuvwxyz:0123", min_size=1, max_size=8)))
    def values(option, value):
        CASES["cli option (value)"] += 1
        code, err = brainreg("register", image, image, "--out", out, "--model", ckpt, f"--{option}", value,
                             "--zz_not_an_option", "1")  # stops a valid value before any computation
        valid = value == "cpu" if option == "device" else value.lower() in cli.PREALIGN_CHOICES
        line = _error_line(code, err, "--zz_not_an_option" if valid else f"--{option}")
        assert ("unknown option" in line) == valid, line

    @fuzz(20)
    @given(which=st.sampled_from(("moving", "fixed", "moving_label", "model", "out")),
           bad=st.sampled_from(("absent.nii.gz", "x" * 300 + ".nii.gz", "folder", "image.nii.gz/inside")))
    @example(which="moving", bad="x" * 300 + ".nii.gz")  # OSError: File name too long
    @example(which="model", bad="x" * 300 + ".pt")
    @example(which="out", bad="x" * 300)
    def paths(which, bad):
        CASES["cli option (path)"] += 1
        path = folder / bad
        args = {"moving": image, "fixed": image, "out": out, "model": ckpt, which: path}
        argv = ["register", args["moving"], args["fixed"], "--out", args["out"], "--model", args["model"],
                "--zz_not_an_option", "1"]
        if which == "moving_label":
            argv += ["--moving_label", path]
        code, err = brainreg(*argv)
        if which == "out" and bad in ("absent.nii.gz", "folder"):  # a new or an existing folder: fine
            _error_line(code, err, "--zz_not_an_option")
            return
        _error_line(code, err, Path(bad).name)

    (folder / "folder").mkdir(exist_ok=True)
    for target, run in (("cli option (misspelt)", misspelt), ("cli option (value)", values), ("cli option (path)", paths)):
        start = time.monotonic()
        run()
        _tried(target, start)
    assert not out.exists(), "an output folder was made for a command that failed"


# ============================================================================================= brainreg subprocesses

def test_brainreg_commands(tmp_path, cli_inputs):
    """Real ``brainreg`` runs (the console script, fresh processes, run side by side): a truncated image through the
    whole pipeline (``monai.bundle run``, the error hook) and a misspelt option; one error line, last."""
    _, image, ckpt = cli_inputs
    truncated = write_image(image_spec(kind="truncated"), tmp_path, "scan")
    common = ["--out", tmp_path / "out", "--model", ckpt, "--device", "cpu", "--prealign", "none"]
    cases = [
        (["register", truncated, image, *common], truncated.name),
        (["register", image, image, *common, "--moving-lable", image], "--moving_lable (did you mean --moving_label"),
    ]
    start = time.monotonic()
    script = Path(sys.executable).with_name("brainreg")  # the console script; else the same main
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "bundle"]
    runs = [subprocess.Popen([*command, *map(str, argv)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=bundle_env(), cwd=tmp_path) for argv, _ in cases]
    for run, (_, expected) in zip(runs, cases):
        CASES["brainreg (subprocess)"] += 1
        _, err = run.communicate(timeout=300)
        _error_line(run.returncode, err, expected)
    assert not (tmp_path / "out").exists()
    _tried("brainreg (subprocess)", start)


FUZZ_TESTS = ("test_datalists", "test_images", "test_images_prealigned", "test_label_maps", "test_checkpoints",
              "test_cli_options", "test_brainreg_commands")
MIN_CASES = 1000


def test_the_campaign_tried_at_least_1000_cases(request):
    """Runs last in this module: when every fuzz test above ran (a full run), their cases add up to 1,000 or more."""
    ran = {item.name for item in request.session.items if item.module is request.module}
    if not ran.issuperset(FUZZ_TESTS):
        pytest.skip(f"only part of the campaign was selected ({sorted(ran & set(FUZZ_TESTS))})")
    assert sum(CASES.values()) >= MIN_CASES, dict(CASES)
