"""Speed and memory of registration networks: ours vs MONAI's VoxelMorph vs the voxelmorph package.

For each device, volume size, model and mode it times batch-1 steps on random volumes already on the
device (data loading and host-to-device copies are not included) and prints a Markdown table, then the
CSV (or writes the CSV to ``--csv``):

- ``infer``: one pair registered under ``torch.inference_mode()``: DDF and warped moving image (the joint
  model: ``predict``, which also segments both images and warps the moving segmentation);
- ``train``: forward, loss, backward and an Adam step. The registration models share one loss, LNCC
  (window 9) of their own warped image + diffusion of their DDF; the joint model uses the bundle's
  ``JointRegSegLoss`` (tumour-masked LNCC, diffusion, weighted cross-entropy + Dice of both segmentations).

Per case: ``conv GFLOP`` counts the network's convolutions in one inference forward pass (2 x
multiply-adds; a training step is about three times that); ``ms/pair`` is the median wall-clock time over ``--repeats`` steps after ``--warmup`` steps
(``first call ms`` is the very first step: allocation, cuDNN autotuning, compilation); ``pairs/s`` is
``1000 / ms``; ``CPU ms/pair`` is the median process CPU time of a step, all threads (on a CPU shared with
other jobs it is steadier than the wall clock, notably with ``--threads 1``); ``peak MB``
is the peak memory of the case above what was allocated before it (weights, inputs, activations,
gradients and optimizer state): on a GPU ``torch.cuda.max_memory_allocated``, on the CPU the peak
resident set size (Linux ``VmHWM``, reset per case; each CPU case runs in a forked process so that freed
memory of an earlier case cannot hide its peak).

Models (``--models``): ``reg`` our RegistrationUNet with VM-2 channels; ``reg_half`` the same with
``half_res=True``; ``joint`` our JointRegSegNet; ``monai`` ``monai.networks.nets.VoxelMorph`` (default
VM-2-sized backbone); ``voxelmorph`` the ``voxelmorph`` package's ``VxmPairwise`` with
``nb_features=[[16, 32, 32, 32], [32, 32, 32, 32]]`` (a VM-2-sized U-Net, ~306 k parameters). All predict a
DDF directly by default; ``--integration-steps N`` makes all of them diffeomorphic (N squarings).

    python benchmarks/speed.py                                  # CPU, 96^3 and 160x192x224, all models
    python benchmarks/speed.py --device cuda --amp --channels-last --compile --cudnn-benchmark
    python benchmarks/speed.py --sizes 256,256,256 --models reg reg_half --modes infer
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib.metadata
import io
import math
import multiprocessing
import os
import platform
import re
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from monai.networks.blocks import Warp  # noqa: E402
from torch import nn  # noqa: E402

from bundle.engines import accelerate  # noqa: E402
from bundle.losses import JointRegSegLoss, make_similarity, make_smoothness  # noqa: E402
from bundle.networks import VM2_CHANNELS, JointRegSegNet, RegistrationUNet  # noqa: E402

MODELS = ("reg", "reg_half", "joint", "monai", "voxelmorph")
DEFAULT_MODELS = ("reg", "joint", "monai", "voxelmorph")
MODES = ("infer", "train")
DEFAULT_SIZES = ((96, 96, 96), (160, 192, 224))
SIZE_DIVISOR = 16  # every model halves the size four times
VXM_FEATURES = [[16, 32, 32, 32], [32, 32, 32, 32]]
# (warm-up, repeats) when not given: CPU steps at 160x192x224 take tens of seconds on a few cores
DEFAULT_COUNTS = {"cpu": (1, 2), "cuda": (10, 50)}
MIN_COMPILE_WARMUP = 3


# --- models: every one maps (moving, fixed) to a dict with at least "ddf" ---------------------------------


class OursAdapter(nn.Module):
    """Our single-tensor network ``cat([moving, fixed]) -> ddf``, plus the warp of the moving image."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.warp = Warp(mode="bilinear", padding_mode="border")

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> dict[str, torch.Tensor]:
        ddf = self.net(torch.cat([moving, fixed], dim=1))
        return {"warped": self.warp(moving, ddf), "ddf": ddf}


class JointAdapter(nn.Module):
    """The joint model: packed output for training, ``predict`` (all outputs, warps included) for inference."""

    def __init__(self, net: JointRegSegNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.cat([moving, fixed], dim=1)
        return {"packed": self.net(x)} if self.training else self.net.predict(x)


class MonaiAdapter(nn.Module):
    """``monai.networks.nets.VoxelMorph``: ``(moving, fixed) -> (warped, ddf)``."""

    def __init__(self, integration_steps: int) -> None:
        super().__init__()
        from monai.networks.nets import VoxelMorph

        self.net = VoxelMorph(integration_steps=integration_steps, spatial_dims=3)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> dict[str, torch.Tensor]:
        warped, ddf = self.net(moving, fixed)
        return {"warped": warped, "ddf": ddf}


class VoxelmorphAdapter(nn.Module):
    """The voxelmorph package's ``VxmPairwise`` (PyTorch): ``(moving, fixed) -> (ddf, warped)``."""

    def __init__(self, integration_steps: int) -> None:
        super().__init__()
        import voxelmorph as vxm  # imported on use: neurite imports matplotlib

        self.net = vxm.nn.models.VxmPairwise(3, 1, 1, nb_features=VXM_FEATURES, integration_steps=integration_steps)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> dict[str, torch.Tensor]:
        ddf, warped = self.net(moving, fixed, return_warped_source=True)
        return {"warped": warped, "ddf": ddf}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_model(name: str, integration_steps: int) -> nn.Module:
    """The adapter for ``name`` (see :data:`MODELS`).

    Raises:
        ValueError: unknown name.
        ModuleNotFoundError: ``voxelmorph`` is not installed.
    """
    if name in ("reg", "reg_half"):
        net = RegistrationUNet(channels=VM2_CHANNELS, integration_steps=integration_steps, half_res=name == "reg_half")
        return OursAdapter(net)
    if name == "joint":
        steps = integration_steps or 7
        return JointAdapter(JointRegSegNet(deformation="svf" if integration_steps else "ddf", integration_steps=steps))
    if name == "monai":
        return MonaiAdapter(integration_steps)
    if name == "voxelmorph":
        if _version("voxelmorph") is None:
            raise ModuleNotFoundError(
                "voxelmorph is not installed: pip install 'voxelmorph>=0.3.4' (PyTorch-only since 0.3), "
                "or pip install -e '.[benchmarks]'"
            )
        return VoxelmorphAdapter(integration_steps)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}.")


def make_loss(name: str, device: torch.device) -> Callable[[dict, torch.Tensor, torch.Tensor, dict], torch.Tensor]:
    """Training loss of a model's outputs (see the module docstring)."""
    if name == "joint":
        joint = JointRegSegLoss(num_classes=2, dice_weight=1.0, class_weights=[1.0, 10.0]).to(device)
        return lambda out, moving, fixed, tumours: joint(out["packed"], {"moving": moving, "fixed": fixed, **tumours})
    similarity, smoothness = make_similarity("lncc"), make_smoothness("diffusion")
    return lambda out, moving, fixed, tumours: similarity(out["warped"], fixed) + smoothness(out["ddf"])


# --- one case -----------------------------------------------------------------------------------------


@dataclass
class Case:
    device: str
    model: str
    size: tuple[int, int, int]
    mode: str
    warmup: int
    repeats: int
    amp: bool
    channels_last: bool
    compile: bool
    threads: int | None
    integration_steps: int


@dataclass
class Row:
    device: str
    model: str
    size: str
    mode: str
    params: int | None
    conv_gflop: float | None
    dtype: str
    channels_last: bool
    compile: bool
    threads: int
    warmup: int
    repeats: int
    first_ms: float | None
    ms_per_pair: float | None
    cpu_ms_per_pair: float | None
    pairs_per_s: float | None
    peak_mb: float | None
    status: str


def amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 where supported (CPUs, Ampere+ GPUs), fp16 on older GPUs."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class PeakMemory:
    """Peak memory of a block above the memory in use when it starts, in MB.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the peak resident set size, ``VmHWM`` reset through
    ``/proc/self/clear_refs`` (Linux); elsewhere the growth of ``ru_maxrss``, a lower bound when the process
    had a higher peak before.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0.0
        self.use_hwm = False

    @staticmethod
    def _status_mb(field: str) -> float:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
        if match is None:
            raise OSError(f"no {field} in /proc/self/status")
        return int(match.group(1)) / 1024

    @staticmethod
    def _maxrss_mb() -> float:  # kB on Linux, bytes on macOS
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5": VmHWM := current RSS (Linux >= 4.0)
            self.base, self.use_hwm = self._status_mb("VmRSS"), True
        except OSError:
            self.base, self.use_hwm = self._maxrss_mb(), False

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        return (self._status_mb("VmHWM") if self.use_hwm else self._maxrss_mb()) - self.base


def conv_gflop(name: str, size: tuple[int, int, int], integration_steps: int) -> float:
    """GFLOP (2 x multiply-adds) of the network's convolutions in one inference forward pass.

    Counted with forward hooks on meta-device inputs: no memory, no compute.
    """
    model = build_model(name, integration_steps).eval()
    macs = 0

    def count(module: nn.Module, inputs, output: torch.Tensor) -> None:
        nonlocal macs
        macs += output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            module.register_forward_hook(count)
    x = torch.empty(1, 1, *size, device="meta")
    with torch.no_grad():
        model(x, x)
    return 2 * macs / 1e9


def _empty_row(case: Case, status: str = "ok") -> Row:
    return Row(
        device=case.device, model=case.model, size="x".join(map(str, case.size)), mode=case.mode, params=None,
        conv_gflop=None, dtype="fp32", channels_last=case.channels_last, compile=case.compile,
        threads=case.threads or torch.get_num_threads(), warmup=case.warmup, repeats=case.repeats, first_ms=None,
        ms_per_pair=None, cpu_ms_per_pair=None, pairs_per_s=None, peak_mb=None, status=status,
    )


def run_case(case: Case) -> Row:
    """Build, time and measure one case; an error becomes the row's status."""
    device = torch.device(case.device)
    if case.threads:
        torch.set_num_threads(case.threads)
    dtype = amp_dtype(device) if case.amp else torch.float32
    row = _empty_row(case)
    row.dtype = {torch.float32: "fp32", torch.bfloat16: "bf16-autocast", torch.float16: "fp16-autocast"}[dtype]
    row.threads = torch.get_num_threads()
    memory = PeakMemory(device)
    memory.start()
    try:
        row.conv_gflop = conv_gflop(case.model, case.size, case.integration_steps)
        model = build_model(case.model, case.integration_steps).to(device)
        row.params = sum(p.numel() for p in model.parameters())
        fmt = torch.channels_last_3d if case.channels_last else torch.contiguous_format
        g = torch.Generator().manual_seed(0)
        moving, fixed = (torch.rand(1, 1, *case.size, generator=g).to(device, memory_format=fmt) for _ in range(2))
        tumours = {  # the joint loss's tumour labels; not allocated for the other cases
            k: (torch.rand(1, 1, *case.size, generator=g) > 0.99).float().to(device)
            for k in ("moving_tumour", "fixed_tumour")
            if case.model == "joint" and case.mode == "train"
        }
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            run = accelerate(model, compile=case.compile, channels_last=case.channels_last)
            if case.mode == "train":
                step = _train_step(run, case.model, moving, fixed, tumours, dtype)
            else:
                step = _infer_step(run, moving, fixed, dtype)
            times, cpu_times = _time(step, case.warmup + case.repeats, device)
        row.first_ms = times[0]
        row.ms_per_pair = statistics.median(times[case.warmup :])
        row.cpu_ms_per_pair = statistics.median(cpu_times[case.warmup :])
        row.pairs_per_s = 1000.0 / row.ms_per_pair
        row.peak_mb = memory.peak_mb()
        compile_notes = [str(w.message) for w in caught if "torch.compile" in str(w.message)]
        if compile_notes:  # accelerate() or CompiledModule ran the model eagerly
            row.status = f"ok, eager: {compile_notes[0]}"[:300]
    except Exception as e:  # report it and go on with the other cases
        message = str(e).strip().splitlines()
        row.status = f"error: {type(e).__name__}: {message[0] if message else ''}"[:300]
    return row


def _autocast(dtype: torch.dtype, device: torch.device):
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def _infer_step(model: nn.Module, moving: torch.Tensor, fixed: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    model.eval()
    device = moving.device

    def step() -> None:
        with torch.inference_mode(), _autocast(dtype, device):
            model(moving, fixed)

    return step


def _train_step(model: nn.Module, name: str, moving, fixed, tumours, dtype: torch.dtype) -> Callable[[], None]:
    model.train()
    device = moving.device
    loss_fn = make_loss(name, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(dtype, device):
            loss = loss_fn(model(moving, fixed), moving, fixed, tumours)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return step


def _time(step: Callable[[], None], n: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU ms (all threads) of ``n`` calls of ``step``, each synchronised with the device."""
    times, cpu_times = [], []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000.0)
        cpu_times.append((time.process_time() - cpu_start) * 1000.0)
    return times, cpu_times


def _case_in_child(case: Case, conn) -> None:
    conn.send(run_case(case))
    conn.close()


def preload(models: list[str], modes: list[str], integration_steps: int) -> None:
    """Run every model once at 16^3 on one thread before forking the CPU cases.

    The library code that a first convolution, warp or backward pass pages in then belongs to the parent, so
    it is not counted in the peak memory of each case (80-120 MB otherwise). One thread: no OpenMP thread
    team exists before the forks (GNU OpenMP cannot use one inherited across ``fork``).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in models:
            for mode in modes:
                case = Case("cpu", name, (16, 16, 16), mode, 0, 1, False, False, False, 1, integration_steps)
                run_case(case)  # errors are reported by the real cases
    finally:
        torch.set_num_threads(threads)


def run_isolated(case: Case) -> Row:
    """Run a CPU case in a forked process (clean peak RSS; a process killed for memory ends only its case)."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_case_in_child, args=(case, send))
    process.start()
    send.close()
    try:
        row = receive.recv()
    except EOFError:
        row = None
    process.join()
    if row is None:
        killed = process.exitcode is not None and process.exitcode < 0
        note = ", killed: out of memory?" if killed else ""
        row = _empty_row(case, f"error: the case process died (exit code {process.exitcode}{note})")
    return row


# --- reporting ----------------------------------------------------------------------------------------


def hardware(device: str) -> str:
    """One line describing the device."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    model = platform.processor() or platform.machine()
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        model = match.group(1).strip() if match else model
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def markdown(rows: list[Row], header: list[str]) -> str:
    lines = [f"<!-- {line} -->" for line in header]
    lines += [
        "| device | model | size | mode | params | conv GFLOP | ms/pair | pairs/s | CPU ms/pair | peak MB | first call ms | status |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        pairs = None if r.pairs_per_s is None else float(f"{r.pairs_per_s:.3g}")
        lines.append(
            f"| {r.device} | {r.model} | {r.size} | {r.mode} | {_fmt(r.params)} | {_fmt(r.conv_gflop)} | {_fmt(r.ms_per_pair)} | "
            f"{'–' if pairs is None else f'{pairs:g}'} | {_fmt(r.cpu_ms_per_pair)} | {_fmt(r.peak_mb, 0)} | "
            f"{_fmt(r.first_ms)} | {r.status} |"
        )
    return "\n".join(lines)


def to_csv(rows: list[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(Row)], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in asdict(r).items()})
    return buffer.getvalue()


# --- command line -------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        size = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be D,H,W integers, got {text!r}") from None
    if len(size) != 3 or any(s <= 0 or s % SIZE_DIVISOR for s in size):
        raise argparse.ArgumentTypeError(f"size must be three positive multiples of {SIZE_DIVISOR} (D,H,W), got {text!r}")
    return size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", nargs="+", choices=("auto", "cpu", "cuda"), default=["auto"],
                        help="devices to run on; auto: cuda when available, else cpu (default)")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=list(DEFAULT_SIZES), metavar="D,H,W",
                        help="volume sizes, multiples of 16 (default: 96,96,96 160,192,224)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(DEFAULT_MODELS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per case (default: cpu 2, cuda 50)")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed steps first (default: cpu 1, cuda 10; at least {MIN_COMPILE_WARMUP} with --compile)")
    parser.add_argument("--amp", action="store_true", help="autocast: bf16 where supported (CPU, Ampere+ GPUs), else fp16")
    parser.add_argument("--channels-last", action="store_true", help="torch.channels_last_3d weights and inputs")
    parser.add_argument("--compile", action="store_true", help="torch.compile (falls back to eager with a message)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark: autotune convolutions for the fixed size (GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--integration-steps", type=int, default=0, help="0: DDF models (default); N: diffeomorphic")
    parser.add_argument("--csv", type=Path, default=None, help="write the CSV here (default: print it after the table)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.integration_steps < 0:
        parser.error(f"--integration-steps must be >= 0, got {args.integration_steps}")
    devices = []
    for d in args.device:
        d = ("cuda" if torch.cuda.is_available() else "cpu") if d == "auto" else d
        if d == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU is available to this torch build")
        if d not in devices:
            devices.append(d)
    args.device = sorted(devices, key=lambda d: d != "cpu")  # CPU cases fork: before CUDA is initialised
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    rows = []
    isolate = "cpu" in args.device and "fork" in multiprocessing.get_all_start_methods()
    if isolate:
        preload(args.models, args.modes, args.integration_steps)
    for device in args.device:
        warmup, repeats = DEFAULT_COUNTS[device]
        if args.compile:  # the second call recompiles too: grids cached on the first call change the guards
            warmup = max(warmup, MIN_COMPILE_WARMUP)
        warmup = warmup if args.warmup is None else args.warmup
        repeats = repeats if args.repeats is None else args.repeats
        for size in args.sizes:
            for model in args.models:
                for mode in args.modes:
                    case = Case(device, model, size, mode, warmup, repeats, args.amp, args.channels_last, args.compile,
                                args.threads, args.integration_steps)
                    row = run_isolated(case) if isolate and device == "cpu" else run_case(case)
                    print(f"{row.device} {row.model} {row.size} {row.mode}: {_fmt(row.ms_per_pair)} ms/pair, "
                          f"peak {_fmt(row.peak_mb, 0)} MB, {row.status}", file=sys.stderr, flush=True)
                    rows.append(row)
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    versions = f"torch {torch.__version__}, monai {_version('monai')}, voxelmorph {_version('voxelmorph') or 'not installed'}"
    header = [f"{d}: {hardware(d)}" for d in args.device] + [
        versions,
        f"options: amp={args.amp} channels_last={args.channels_last} compile={args.compile} "
        f"threads={args.threads or torch.get_num_threads()} integration_steps={args.integration_steps}"
        + (f" cudnn.benchmark={args.cudnn_benchmark} cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}"
           if "cuda" in args.device else ""),
        f"1-min load average: {_fmt(load_start, 2)} at start, {_fmt(load_end, 2)} at end",
        "command: python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
    ]
    print(markdown(rows, header))
    if args.csv is None:
        print()
        print(to_csv(rows), end="")
    else:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        args.csv.write_text(to_csv(rows))
        print(f"\nCSV: {args.csv}")
    return rows


if __name__ == "__main__":
    main()
