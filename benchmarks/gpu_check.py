"""What only a GPU can show, in one short script (a few minutes on one GPU): the CUDA prefetcher
equals the CPU path, fp16 / bf16 training steps stay finite and learn, `--amp auto` resolves as
specified, the data path is hidden behind the model step, `--compile` / `--channels_last` speed-ups,
and a 1-process NCCL torchrun run. Prints a markdown table and writes it to --out.

    python benchmarks/gpu_check.py                 # on a machine without CUDA: says so, exits 0
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from common import ROOT, bench_data_dir, machine, report

from augment import create_transforms  # noqa: E402
from dataset import MaskBaseDataset, PrefetchLoader, Subset, fast_collate  # noqa: E402
from loss import create_multi_head_loss  # noqa: E402
from model import build_model, resolve_amp  # noqa: E402
from precision import autocast, cuda_capability

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


def step_speed(model, images, targets, amp, channels_last=False):
    """Images/s of training steps on one resident batch (the pure model step)."""
    step = make_step(model, {"class": 18}, amp, lr=1e-4)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return len(images) / timed(lambda: step(images, targets), 10)


def check_speed(table, rows, amp):
    """The data path against the model step at batch 64, 224x224, 4 workers; compile and channels_last."""
    train_tf, _ = create_transforms("CustomAugmentation", (224, 224), crop_fraction=(1, 1))
    dataset = Subset(MaskBaseDataset(table=table), range(min(len(table), 640)), train_tf)
    loader = PrefetchLoader(DataLoader(dataset, 64, shuffle=True, num_workers=4, collate_fn=fast_collate,
                                       pin_memory=True, persistent_workers=True, drop_last=True), MEAN, STD, "cuda")
    for _ in loader:  # start the workers
        break
    started = time.perf_counter()
    seen = sum(len(images) for images, _ in loader)
    torch.cuda.synchronize()
    loader_speed = seen / (time.perf_counter() - started)
    model = build_model("single_head", "efficientnet_lite0").cuda().to(memory_format=torch.channels_last)
    images = torch.randn(64, 3, 224, 224, device="cuda")
    targets = torch.randint(0, 18, (64,), device="cuda")
    model_speed = step_speed(model, images, targets, amp, channels_last=True)
    step = make_step(model, {"class": 18}, amp, lr=1e-4)
    torch.cuda.synchronize()
    started, seen = time.perf_counter(), 0
    for batch, target in loader:
        step(batch.contiguous(memory_format=torch.channels_last), target % 18)
        seen += len(batch)
    torch.cuda.synchronize()
    epoch_speed = seen / (time.perf_counter() - started)
    rows.append(("loader alone (4 workers, 224x224, batch 64)", f"{loader_speed:.0f} img/s", None, "uint8 path"))
    rows.append(("model step alone (efficientnet_lite0)", f"{model_speed:.0f} img/s", None, f"amp {amp}"))
    ratio = model_speed / epoch_speed
    rows.append(("epoch time / model-step time", f"{ratio:.2f}x", ratio <= 1.1, "target <= 1.1x"))
    for name in ("resnet18", "efficientnet_lite0"):
        plain = step_speed(build_model("single_head", name).cuda(), images, targets, amp)
        last = step_speed(build_model("single_head", name).cuda().to(memory_format=torch.channels_last), images,
                          targets, amp, channels_last=True)
        compiled = step_speed(torch.compile(build_model("single_head", name).cuda()), images, targets, amp)
        rows.append((f"{name}: channels_last speed-up", f"{last / plain:.2f}x", None,
                     f"{plain:.0f} -> {last:.0f} img/s"))
        rows.append((f"{name}: torch.compile speed-up", f"{compiled / plain:.2f}x", None,
                     f"{plain:.0f} -> {compiled:.0f} img/s"))


def check_torchrun(rows, work_dir):
    """A 1-process NCCL torchrun training run starts and finishes."""
    data = bench_data_dir(24, work_dir).parent
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", str(ROOT / "train.py"),
               "--data_dir", str(data / "train"), "--model_dir", str(Path(work_dir) / "runs"), "--model", "resnet18",
               "--resize", "64", "48", "--epochs", "1", "--num_workers", "2", "--name", "nccl"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    ok = result.returncode == 0 and "best validation macro F1" in result.stdout
    detail = f"exit {result.returncode}, {time.perf_counter() - started:.0f} s"
    if not ok:
        detail += ": " + (result.stderr.strip().splitlines() or ["no output"])[-1][:120]
    rows.append(("1-process NCCL torchrun run", detail, ok, "finishes"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "masktrain_gpu_check"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.md"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to check (exit 0)")
        return None
    torch.backends.cudnn.benchmark = True
    table = MaskBaseDataset(bench_data_dir(200, args.work_dir), check_images=False).table
    amp = resolve_amp("auto", torch.device("cuda"))[0]
    rows = []
    checks = {"prefetcher": lambda: check_prefetcher(table, rows), "amp": lambda: check_amp(rows),
              "speed": lambda: check_speed(table, rows, amp), "torchrun": lambda: check_torchrun(rows, args.work_dir)}
    for what, check in checks.items():
        try:
            check()
        except Exception as error:  # one failing check must not hide the others
            rows.append((what, f"raised {type(error).__name__}: {error}"[:160], False, ""))
    name = torch.cuda.get_device_name()
    lines = [f"GPU check on {name} (compute capability {'.'.join(map(str, cuda_capability(torch.device('cuda'))))}), "
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, `--amp auto` -> {amp}; host: {machine()}", "",
             "| check | result | pass | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {what} | {result} | {'-' if ok is None else 'yes' if ok else '**no**'} | {note} |"
              for what, result, ok, note in rows]
    report(lines, args.out)
    return rows


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    main()
