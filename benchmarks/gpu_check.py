"""Every GPU path in one command (under 7 minutes on one GPU): the CUDA prefetcher equals the CPU path,
fp16 / bf16 steps stay finite and learn, `--amp auto` resolves as specified; train.py itself on the GPU in
the card's precision with `--compile`, `--device_aug`, `--reprob`, fp16 with `--clip_grad` and `--ema`,
`--grad_accum`, `--cache_features`, a kill -9 and `--resume`, `--deterministic on` (two runs, the same
weights); inference.py and ensemble.py; torchrun with a real NCCL process group (2 processes where there
are 2 GPUs, else 1); and the data path: one epoch of resnet50 at 224 px, batch 64, through train.py with
and without `--cache`, and through a plain loader without the prefetcher, against the pure model step on
the same batches (target: within 1.1x). Prints a markdown table naming the card, driver, torch and CUDA
build, and writes it to --out.

    python benchmarks/gpu_check.py                 # on a machine without CUDA: says so, exits 0
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader

from common import ROOT, bench_data_dir, machine, report

from augment import create_transforms  # noqa: E402
from dataset import MaskBaseDataset, PrefetchLoader, Subset, fast_collate  # noqa: E402
from loss import create_multi_head_loss  # noqa: E402
from model import build_model  # noqa: E402
from precision import autocast, cuda_capability, resolve_amp  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def check_prefetcher(table, rows):
    """Largest absolute difference between the CUDA and the CPU prefetcher's normalised batches."""
    _, val_tf = create_transforms("BaseAugmentation", (224, 224))
    loader = DataLoader(Subset(MaskBaseDataset(table=table), range(128), val_tf), 64, collate_fn=fast_collate)
    worst = 0.0
    for (gpu, _), (cpu, _) in zip(PrefetchLoader(loader, MEAN, STD, "cuda"), PrefetchLoader(loader, MEAN, STD, "cpu"),
                                  strict=True):
        worst = max(worst, (gpu.cpu() - cpu).abs().max().item())
    tolerance = 1e-5
    rows.append(("CUDA prefetcher = CPU path", f"max abs difference {worst:.2e}", worst <= tolerance,
                 f"tolerance {tolerance:g}"))


def make_step(model, heads, amp, lr=1e-3):
    """A training step function (images, targets) -> loss tensor, with AdamW and, for fp16, a grad scaler."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    criterion = create_multi_head_loss("cross_entropy", heads).cuda()

    def step(images, targets):
        with autocast(torch.device("cuda"), amp):
            loss, _ = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()
    return step


def train_steps(name, kind, amp, steps=12):
    """(first loss, last loss, all finite) of `steps` steps on one fixed random batch."""
    torch.manual_seed(0)
    heads = {"class": 18} if kind == "single_head" else {"mask": 3, "gender": 2, "age": 3}
    step = make_step(build_model(kind, name).cuda(), heads, amp)
    images = torch.randn(32, 3, 224, 224, device="cuda")
    targets = (torch.randint(0, 18, (32,), device="cuda") if kind == "single_head" else
               torch.stack([torch.randint(0, n, (32,), device="cuda") for n in heads.values()], 1))
    losses = [step(images, targets).item() for _ in range(steps)]
    return losses[0], losses[-1], all(map(torch.isfinite, map(torch.tensor, losses)))


def check_amp(rows):
    for name, kind in (("resnet18", "single_head"), ("efficientnet_lite0", "three_head")):
        for amp in ("fp16", "bf16"):
            first, last, finite = train_steps(name, kind, amp)
            rows.append((f"{amp} steps, {name} {kind}", f"loss {first:.3f} -> {last:.3f}", finite and last < first,
                         "finite and lower"))
    major, minor = cuda_capability(torch.device("cuda"))
    amp, reason = resolve_amp("auto", torch.device("cuda"))
    expected = "bf16" if major >= 8 else "fp16"
    rows.append(("--amp auto", f"{amp} ({reason})", amp == expected, f"expected {expected} for {major}.{minor}"))


def timed(function, repeats):
    function()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def model_step_speed(name, amp, batches):
    """Images/s of training steps of `name` (single head, channels_last) on `batches` already on the GPU."""
    model = build_model("single_head", name).cuda().to(memory_format=torch.channels_last)
    step = make_step(model, {"class": 18}, amp, lr=1e-4)
    return sum(len(images) for images, _ in batches) / timed(lambda: [step(i, t) for i, t in batches], 2)


def check_data_path(table, rows, amp, work_dir, data_dir):
    """One epoch of resnet50 at 224 px, batch 64: the pure model step on resident batches, train.py's own
    epoch (prefetcher) with and without --cache, and a plain loader without the prefetcher."""
    train_tf, _ = create_transforms("CustomAugmentation", (224, 224), crop_fraction=(1, 1))
    dataset = Subset(MaskBaseDataset(table=table), range(len(table)), train_tf)
    loader = DataLoader(dataset, 64, shuffle=True, num_workers=8, collate_fn=fast_collate, pin_memory=True,
                        persistent_workers=True, drop_last=True)
    batches = [(images.float().cuda().contiguous(memory_format=torch.channels_last), targets.cuda() % 18)
               for images, targets in loader]
    pure = model_step_speed("resnet50", amp, batches)
    rows.append(("model step alone (resnet50, 224 px, batch 64)", f"{pure:.0f} img/s", None, f"amp {amp}"))
    model = build_model("single_head", "resnet50").cuda().to(memory_format=torch.channels_last)
    step = make_step(model, {"class": 18}, amp, lr=1e-4)
    mean, std = torch.tensor(MEAN, device="cuda").view(1, 3, 1, 1), torch.tensor(STD, device="cuda").view(1, 3, 1, 1)

    def plain_epoch():
        for images, targets in loader:
            images = ((images.cuda().float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
            step(images, targets.cuda() % 18)

    plain = len(batches) * 64 / timed(plain_epoch, 1)
    rows.append(("epoch without the prefetcher / model step", f"{pure / plain:.2f}x", None,
                 f"{plain:.0f} img/s; a plain loop moving batches on the default stream"))
    for name, flags in (("train.py epoch (prefetcher)", []), ("train.py epoch, --cache", ["--cache"])):
        run = train_run(work_dir, data_dir, f"speed{len(flags)}", ["--model", "resnet50", "--resize", "224", "224",
                                                                   "--crop", "1", "1", "--batch_size", "64",
                                                                   "--epochs", "2", "--val_ratio", "0",
                                                                   "--num_workers", "8", "--report", "off", *flags])
        speed = pd.read_csv(run / "log.csv")["images_per_second"].iloc[-1]  # the second epoch: workers warm
        rows.append((f"{name} / model step", f"{pure / speed:.2f}x", pure / speed <= 1.1,
                     f"{speed:.0f} img/s; target <= 1.1x"))


def train_run(work_dir, data_dir, name, flags) -> Path:
    """A train.py run on the GPU (random weights: the machine may be offline); its run folder."""
    import train
    model_dir = Path(work_dir) / "runs"
    train.main(["--data_dir", str(data_dir), "--model_dir", str(model_dir), "--name", name, "--pretrained", "none",
                "--device", "cuda", "--cache_dir", str(Path(work_dir) / "cache"), *flags])
    return max(model_dir.glob(f"{name}*"), key=lambda p: p.stat().st_mtime)


SMALL = ["--model", "resnet18", "--resize", "96", "64", "--epochs", "1", "--num_workers", "4", "--report", "off"]
TRAIN_PATHS = {  # what each train.py path adds to a small run: a variation is a row of this table
    "train.py, --amp auto": [],
    "--compile": ["--compile"],
    "--device_aug": ["--device_aug"],
    "--reprob 0.5": ["--reprob", "0.5"],
    "fp16 + --clip_grad + --ema": ["--amp", "fp16", "--clip_grad", "1", "--ema", "0.99"],
    "--grad_accum 2": ["--grad_accum", "2"],
    "--cache_features": ["--model", "efficientnet_lite0", "--freeze", "3", "--cache_features"],
}


def check_train_paths(rows, work_dir, data_dir):
    """Each of TRAIN_PATHS as a real train.py run on the GPU: it finishes with a finite validation F1."""
    for what, flags in TRAIN_PATHS.items():
        started = time.perf_counter()
        run = train_run(work_dir, data_dir, "path", [*SMALL, *flags])
        f1 = pd.read_csv(run / "log.csv")["val_f1"].iloc[-1]
        config = json.loads((run / "config.json").read_text())
        rows.append((what, f"F1 {f1:.3f}, amp {config['amp_resolved']}, {time.perf_counter() - started:.0f} s",
                     bool(f1 == f1) and (run / "best.pth").is_file(), "finishes, finite F1"))


def check_determinism(rows, work_dir, data_dir):
    """--deterministic on: two runs of one command write the same weights."""
    runs = [train_run(work_dir, data_dir, "det", [*SMALL, "--deterministic", "on", "--num_workers", "2"])
            for _ in range(2)]
    weights = [torch.load(run / "best.pth", map_location="cpu", weights_only=False)["model"] for run in runs]
    same = all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    rows.append(("--deterministic on, two runs", "identical weights" if same else "weights differ", same, ""))


def check_kill_and_resume(rows, work_dir, data_dir):
    """A run killed (-9) after its first epoch, then --resume: it finishes the remaining epochs on the GPU."""
    model_dir = Path(work_dir) / "runs"
    command = [sys.executable, str(ROOT / "train.py"), "--data_dir", str(data_dir), "--model_dir", str(model_dir),
               "--name", "killed", "--pretrained", "none", "--device", "cuda", *SMALL, "--epochs", "3"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if line.startswith("epoch 1/3"):
            process.send_signal(signal.SIGKILL)
            break
    process.wait()
    run = max(model_dir.glob("killed*"), key=lambda p: p.stat().st_mtime)
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(run)], capture_output=True,
                            text=True, timeout=240)
    epochs = len(pd.read_csv(run / "log.csv")) if (run / "log.csv").is_file() else 0
    ok = result.returncode == 0 and "resumed at epoch 2" in result.stdout and epochs == 3
    rows.append(("kill -9, then --resume", f"exit {result.returncode}, {epochs} epochs logged", ok,
                 "resumes at epoch 2, finishes 3"))


def check_inference_and_ensemble(rows, work_dir, data_dir):
    """inference.py and ensemble.py on the GPU with the first train path's runs."""
    import ensemble
    import inference
    runs = sorted((Path(work_dir) / "runs").glob("path*"))[:2]
    out = Path(work_dir) / "output"
    probs = inference.main(["--model_dir", str(runs[0]), "--data_dir", str(data_dir), "--output_dir", str(out),
                            "--device", "cuda", "--overwrite"])
    rows.append(("inference.py (labelled train folder)", f"{len(probs)} images", len(probs) > 0, ""))
    classes = ensemble.main([*map(str, runs), "--data_dir", str(data_dir), "--output_dir", str(out), "--device",
                             "cuda", "--overwrite"])
    rows.append(("ensemble.py (2 runs)", f"{len(classes)} images", len(classes) == len(probs), ""))


def check_torchrun(rows, work_dir, data_dir):
    """torchrun with a real NCCL process group: 2 processes where there are 2 GPUs, else 1."""
    processes = min(2, torch.cuda.device_count())
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", str(ROOT / "train.py"),
               "--data_dir", str(data_dir), "--model_dir", str(Path(work_dir) / "runs"), "--name", "nccl",
               "--pretrained", "none", *SMALL, "--grad_accum", "2"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    ok = (result.returncode == 0 and "best validation macro F1" in result.stdout
          and f"{processes} process(es)" in result.stdout)
    detail = f"exit {result.returncode}, {time.perf_counter() - started:.0f} s"
    if not ok:
        detail += ": " + (result.stderr.strip().splitlines() or ["no output"])[-1][:120]
    rows.append((f"torchrun, {processes} NCCL process(es), DDP", detail, ok, "finishes"))


def driver_version() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()), allow_abbrev=False)
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "masktrain_gpu_check"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.md"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to check (exit 0)")
        return None
    torch.backends.cudnn.benchmark = True
    data_dir = bench_data_dir(24, args.work_dir)
    table = MaskBaseDataset(bench_data_dir(200, args.work_dir), check_images=False).table
    amp = resolve_amp("auto", torch.device("cuda"))[0]
    rows = []
    checks = {"prefetcher": lambda: check_prefetcher(table, rows), "amp": lambda: check_amp(rows),
              "train paths": lambda: check_train_paths(rows, args.work_dir, data_dir),
              "determinism": lambda: check_determinism(rows, args.work_dir, data_dir),
              "kill and resume": lambda: check_kill_and_resume(rows, args.work_dir, data_dir),
              "inference and ensemble": lambda: check_inference_and_ensemble(rows, args.work_dir, data_dir),
              "torchrun": lambda: check_torchrun(rows, args.work_dir, data_dir),
              "data path": lambda: check_data_path(table, rows, amp, args.work_dir, bench_data_dir(200, args.work_dir))}
    for what, check in checks.items():
        started = time.perf_counter()
        try:
            check()
        except BaseException as error:  # one failing check (a SystemExit from a tool too) must not hide the others
            if isinstance(error, KeyboardInterrupt):
                raise
            rows.append((what, f"raised {type(error).__name__}: {error}"[:160], False, ""))
        print(f"gpu_check: {what} took {time.perf_counter() - started:.0f} s", flush=True)
    name = torch.cuda.get_device_name()
    capability = ".".join(map(str, cuda_capability(torch.device("cuda"))))
    lines = [f"GPU check on {name} (compute capability {capability}, driver {driver_version()}), torch "
             f"{torch.__version__}, CUDA build {torch.version.cuda}, {torch.cuda.device_count()} GPU(s), `--amp auto` "
             f"-> {amp}; host: {machine()}", "",
             "| check | result | pass | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {what} | {result} | {'-' if ok is None else 'yes' if ok else '**no**'} | {note} |"
              for what, result, ok, note in rows]
    report(lines, args.out)
    return rows


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    main()
