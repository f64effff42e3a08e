"""The device and the precision a run uses: `--device` (a GPU this torch build cannot run on is a one-line
error before any work, never a silent CPU run), `--amp` (auto: bf16 where the GPU or CPU has it natively,
fp16 with a grad scaler on older GPUs, fp32 elsewhere; on a CPU timed on the model), `--channels_last`, and
`torch.compile` checked against the eager model."""
import copy
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEVICE_CHOICES = ("auto", "cuda", "cpu")


@dataclass(frozen=True)
class Precision:
    """How a run computes, resolved once for its model and device and passed to every stage: the device,
    the mixed precision (off / fp16 / bf16, never auto), the channels-last layout, and the line that says why."""
    device: torch.device
    amp: str
    channels_last: bool
    line: str


class DeviceError(RuntimeError):
    """A device that cannot run this torch build, said in one line with the fix."""


def gpu_present() -> bool:
    """Whether an NVIDIA GPU is in this machine, whatever torch can do with it (its driver's files); a GPU
    hidden with CUDA_VISIBLE_DEVICES="" (or -1) counts as none."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


def torch_build() -> str:
    """This torch's version and CUDA build, e.g. "torch 2.14.1+cu130 (CUDA 13.0)" or "... (a CPU build)"."""
    return f"torch {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'a CPU build'})"


INSTALL_FIX = ("install a torch built for it from PyTorch's index first (README, Install: a CUDA 12.x build for a V100 "
               "or T4), or pass --device cpu")


def cuda_problem(index=0) -> str | None:
    """Why this torch cannot run on GPU `index` (None where it can): no CUDA in the build, a driver too old
    for the build, or a card whose compute capability the build has no kernels for (a CUDA 13 build on a
    V100: sm_70 is not in `torch.cuda.get_arch_list()`, and no PTX it could compile from)."""
    if not torch.version.cuda:
        return f"this is {torch_build()}" if gpu_present() else "this machine has no GPU"
    if not torch.cuda.is_available():
        if gpu_present():
            return (f"CUDA cannot start with {torch_build()}: the NVIDIA driver is probably older than this build "
                    "needs (nvidia-smi shows its CUDA version)")
        return "this machine has no GPU"
    major, minor = torch.cuda.get_device_capability(index)
    archs = torch.cuda.get_arch_list()
    card = major * 10 + minor
    numbers = [(arch.split("_")[0], int(arch.split("_")[1])) for arch in archs if arch.split("_")[-1].isdigit()]
    # kernels built for sm_86 run on an 8.9 card (same major, lower minor); PTX compiles for any newer one
    if any(kind == "sm" and number // 10 == major and number <= card or kind == "compute" and number <= card
           for kind, number in numbers):
        return None
    return (f"the {torch.cuda.get_device_name(index)} (compute capability {major}.{minor}, sm_{major}{minor}) cannot "
            f"run {torch_build()}, built for {' '.join(archs)}")


def select_device(asked="auto", index=0) -> torch.device:
    """The device for --device `asked`: cpu; cuda (GPU `index`, or a DeviceError saying why not); auto: the
    GPU where this torch runs on it, the CPU where the machine has none, and a DeviceError where a GPU is
    here that this torch cannot use (a silent CPU run would take 50x as long)."""
    if asked not in DEVICE_CHOICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICE_CHOICES)}, got {asked!r}")
    if asked == "cpu":
        return torch.device("cpu")
    problem = cuda_problem(index)
    if problem is None:
        return torch.device("cuda", index)
    if asked == "auto" and problem == "this machine has no GPU":
        return torch.device("cpu")
    raise DeviceError(f"--device {asked}: {problem}: {INSTALL_FIX}")


AMP_DTYPES = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}
AMP_CHOICES = ("auto", *AMP_DTYPES)
CHANNELS_LAST_CHOICES = ("auto", "on", "off")
ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                    "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2",
                    "DEFAULT", "ALL")


def cpu_flags() -> str:
    """The CPU's vector features that decide speed here, e.g. "AVX2 AVX-512 AVX512-BF16 AMX", and
    what torch's kernels use ("kernels AVX512"; "forced" when ATEN_CPU_CAPABILITY narrows them)."""
    features = [name for name, has in (("AVX2", torch.cpu._is_avx2_supported()),
                                       ("AVX-512", torch.cpu._is_avx512_supported()),
                                       ("AVX512-BF16", torch.cpu._is_avx512_bf16_supported()),
                                       ("AMX", torch.cpu._is_amx_tile_supported())) if has]
    kernels = torch.backends.cpu.get_cpu_capability()
    forced = [f"{var}={os.environ[var]}" for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if var in os.environ]
    return (" ".join(features or ["no AVX2"]) + f", kernels {kernels}"
            + (f" (forced: {' '.join(forced)})" if forced else ""))


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX) and torch may use it: an
    emulated bf16 (AVX2 only, or kernels forced down by ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA)
    is about 10x slower than fp32."""
    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return isa in ONEDNN_BF16_ISAS


def cuda_capability(device) -> tuple:
    """(major, minor) compute capability of a CUDA device."""
    return torch.cuda.get_device_capability(device)


PROBE_MAX_BATCH = {True: 64, False: 32}  # training, inference: enough images to rank the two precisions
BF16_MIN_GAIN = 1.1  # bf16 only where clearly faster: fp32 is exact, and a near tie is the probe's noise


def faster_of(speeds: dict) -> str:
    """"bf16" where the probe measured it at least BF16_MIN_GAIN times fp32's images/s, else "off" (a
    noisy probe on a no-AMX Xeon measured 35.0 against 34.0 img/s and picked bf16, which then trained
    efficientnet_lite0 at 33 img/s where fp32 runs at 59)."""
    return "bf16" if speeds["bf16"] >= BF16_MIN_GAIN * speeds["off"] else "off"


def faster_cpu_precision(model, input_size, batch_size, train=True, channels_last=False, repeats=2) -> tuple:
    """("bf16" or "off", {precision: images/s}) for `model` on this CPU: a few forward passes (and
    backward with `train`) of a copy of it on random images of `input_size` (H, W; or the (C, H, W) of
    the features a model such as features.FromFeatures takes) at the run's
    `batch_size` (at most PROBE_MAX_BATCH), in each precision, alternated, best time kept (about six
    steps' time); bf16 only where clearly faster (`faster_of`). Whether bf16 pays differs by model and
    input size as well as CPU (on an AMX Xeon bf16 trains ResNet-18 2x faster, EfficientNet-Lite0 at 128 px slower:
    benchmarks/bench_layout.py --probe); the model, its weights, its BatchNorm statistics and the random
    state are left as they were."""
    batch_size = min(batch_size, PROBE_MAX_BATCH[train])
    probe = copy.deepcopy(model).cpu().train(train)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    probe.to(memory_format=layout)
    seconds = {"off": [], "bf16": []}
    with torch.random.fork_rng(devices=[]):
        shape = (3, *input_size) if len(input_size) == 2 else tuple(input_size)
        images = torch.randn(batch_size, *shape).contiguous(memory_format=layout)
        for _ in range(1 + repeats):  # the first round warms up and is not counted
            for amp in seconds:
                started = time.perf_counter()
                with torch.set_grad_enabled(train), autocast(torch.device("cpu"), amp):
                    outputs = probe(images)
                    if train:
                        sum(out.float().sum() for out in outputs.values()).backward()
                seconds[amp].append(time.perf_counter() - started)
    speeds = {amp: batch_size / min(times[1:]) for amp, times in seconds.items()}
    return faster_of(speeds), speeds


def resolve_amp(asked: str, device, probe=None) -> tuple:
    """(precision, reason) for `--amp asked` on `device`. auto: on CUDA bf16 where the GPU has it
    natively (compute capability 8.0+), else fp16 with a grad scaler (V100, T4); on a CPU without
    native bf16 off; on one with it the faster of bf16 and fp32 as `probe()` (a call of
    `faster_cpu_precision` for the model at hand) measures, bf16 where there is no probe. An explicit
    bf16 on a CPU that emulates it warns that it is slow; on a GPU without native bf16 (before 8.0: V100,
    T4) it is switched to fp16 with a grad scaler, with a warning (emulated bf16 is slow, and
    `torch.compile` may fail on it)."""
    device = torch.device(device)
    if asked not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {asked!r}")
    if asked == "bf16" and device.type == "cuda" and cuda_capability(device)[0] < 8:
        major, minor = cuda_capability(device)
        line = (f"CUDA compute capability {major}.{minor} has no native bf16: fp16 with a grad scaler instead of the "
                "bf16 asked for")
        print(f"warning: --amp bf16: {line}", file=sys.stderr)
        return "fp16", line
    if asked != "auto":
        if asked == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
            print(f"warning: --amp bf16 on a CPU without native bf16 ({cpu_flags()}) is emulated and about 10x "
                  "slower than fp32: use --amp auto or off", file=sys.stderr)
        return asked, "asked for"
    if device.type == "cuda":
        major, minor = cuda_capability(device)
        if major >= 8:
            return "bf16", f"CUDA compute capability {major}.{minor} has native bf16"
        return "fp16", f"CUDA compute capability {major}.{minor} has no native bf16: fp16 with a grad scaler"
    if device.type == "cpu":
        if not cpu_has_native_bf16():
            return "off", f"CPU without native bf16 ({cpu_flags()})"
        if probe is None:
            return "bf16", f"CPU with native bf16 ({cpu_flags()})"
        amp, speeds = probe()
        when = f" (as timed on {speeds['timed_on']})" if "timed_on" in speeds else ""
        return amp, (f"CPU with native bf16 ({cpu_flags()}), measured on this model{when}: bf16 "
                     f"{speeds['bf16']:.1f} img/s, fp32 {speeds['off']:.1f} img/s")
    return "off", f"no mixed precision rule for device {device.type}"


def is_convolutional(model: nn.Module) -> bool:
    """True for CNNs (ResNet, EfficientNet, ConvNeXt): convolutions past a patch-embedding stem,
    which a ViT or Swin has as its only one."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 2


def resolve_channels_last(asked: str, model: nn.Module) -> tuple:
    """(bool, reason) for `--channels_last asked`: auto is on for convolutional models (1.00x to 1.55x
    for the model step with native and with AVX2-only kernels, benchmarks/bench_layout.py; the layout
    tensor cores want), off otherwise."""
    if asked in (True, "on"):
        return True, "asked for"
    if asked in (False, None, "off"):
        return False, "asked for"
    if asked != "auto":
        raise ValueError(f"--channels_last must be auto, on or off, got {asked!r}")
    if is_convolutional(model):
        return True, "convolutional model"
    return False, "not a convolutional model"


AMP_TIMINGS = "amp_timings.json"  # in the cache folder: --amp auto's CPU timings by machine and workload


def timing_key(model, input_size, batch_size, train, channels_last) -> str:
    """What a CPU precision timing depends on: the CPU (model name and flags), torch, the model (its
    modules and parameter count), input, batch (as the probe caps it), training or inference, layout."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    layers = sorted({type(m).__name__ for m in model.modules()})
    parts = [cpu, cpu_flags(), torch.__version__, type(model).__name__, layers,
             sum(p.numel() for p in model.parameters()), list(input_size),
             min(batch_size, PROBE_MAX_BATCH[train]), train, bool(channels_last)]
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def remembered_probe(probe, key, record_path):
    """`probe` run once per `key`: its result is kept in the JSON file `record_path` with the date, and
    later calls with the same key return it (so the same command on the same machine trains in the same
    precision), marked "as timed on DATE"."""
    record_path = Path(record_path)

    def remembered():
        record = {}
        if record_path.is_file():
            try:
                record = json.loads(record_path.read_text())
            except (ValueError, OSError):
                record = {}
        if key in record:
            entry = record[key]
            return entry["amp"], {**entry["speeds"], "timed_on": entry["date"]}
        amp, speeds = probe()
        record[key] = dict(amp=amp, speeds=speeds, date=time.strftime("%Y-%m-%d %H:%M"))
        record_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = record_path.with_name(f".{record_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, record_path)
        return amp, speeds

    return remembered


def resolve_precision(model, amp, channels_last, device, input_size, batch_size, train=True, agree=None,
                      remember=None) -> tuple:
    """(amp, channels_last bool, the line that explains both) for running `model` on `device`: the
    rules above, auto's timing on training steps (`train`) or forward passes at the run's batch size.
    `agree` maps the (amp, reason) choice to the one every process uses (train.py: rank 0's).
    `remember`: a JSON file (in the cache folder) where auto's CPU timing is kept per machine and
    workload (`timing_key`), so later runs repeat its choice instead of timing again."""
    layout, layout_reason = resolve_channels_last(channels_last, model)
    probe = lambda: faster_cpu_precision(model, input_size, batch_size, train=train, channels_last=layout)  # noqa: E731
    if remember is not None:
        probe = remembered_probe(probe, timing_key(model, input_size, batch_size, train, layout), remember)
    amp_used, amp_reason = resolve_amp(amp, device, probe=probe)
    if agree is not None:
        amp_used, amp_reason = agree((amp_used, amp_reason))
    return amp_used, layout, (f"amp {amp} -> {amp_used}: {amp_reason}; channels_last {channels_last} -> "
                              f"{'on' if layout else 'off'}: {layout_reason}")


def autocast(device: torch.device, amp="off"):
    """Mixed precision for `amp` in off / fp16 / bf16 (resolved, not auto), on CUDA or CPU."""
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp] or torch.float32, enabled=AMP_DTYPES[amp] is not None)


def checked_compile(model, input_shape, device, amp="off", channels_last=False, tolerance=None) -> tuple:
    """(`torch.compile(model)`, None) where the compiled model's training-mode outputs on a random batch of
    `input_shape` are finite and match the eager model's, else (`model`, the one-line reason). Inductor's
    AVX2 code (forced on an AVX-512 Xeon, torch 2.14.1) computed NaN or wrong training-mode outputs for
    efficientnet_lite0, resnet18 and test_resnet (channels_last, two threads) while eager was right.
    Batch-norm statistics and random states are as before the check; the compiled graph is the one training
    then uses. With dropout or drop path active the two runs differ by chance: only finiteness is checked."""
    compiled = torch.compile(model)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(input_shape, generator=torch.Generator().manual_seed(0)).to(device, memory_format=layout)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast(device, amp):
        got = torch.cat([value.detach().float().flatten() for value in compiled(images).values()])
        want = torch.cat([value.detach().float().flatten() for value in model(images).values()])
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    model.train(was_training)
    stochastic = any((isinstance(m, nn.Dropout) and m.p > 0) or getattr(m, "drop_prob", 0) > 0 for m in model.modules())
    tolerance = tolerance if tolerance is not None else 0.01 if amp == "off" else 0.05
    difference = ((got - want).norm() / (want.norm() + 1e-6)).item()  # fp32 on a CPU: about 1e-4
    if torch.isfinite(got).all() and (stochastic or difference <= tolerance):
        return compiled, None
    isa = f"inductor vector ISA {_inductor_isa()}" if device.type == "cpu" else device.type
    return model, (f"torch.compile's output differs from the eager model's on this machine ({isa}; relative "
                   f"difference {difference:.3g} on a batch of {tuple(input_shape)}): training without compiling")


def _inductor_isa() -> str:
    """The vector instruction set inductor generates CPU code for (avx512, avx2, ...)."""
    from torch._inductor import cpu_vec_isa
    return str(cpu_vec_isa.pick_vec_isa() or "none")
