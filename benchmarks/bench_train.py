"""End-to-end CPU training throughput (data + step), the baseline's loop and loader against this
toolkit's, with the same model, batch and optimizer; explicit precisions beside the `auto` defaults.

    python benchmarks/bench_train.py                        # resnet18 128x96, efficientnet_lite0 224x224
    python benchmarks/bench_train.py --models test_resnet:64x48 --steps 2 --batch_size 8   # smoke run
    python benchmarks/bench_train.py --models efficientnet_lite0:160x160 --configs auto auto_compile  # torch.compile
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_train.py ...  # as an AVX2-only CPU
    python benchmarks/bench_train.py --configs fp32 fp32_nondet bf16_cl bf16_cl_nondet --rounds 3  # determinism

The masktrain configurations run with train.py's --deterministic (auto: on for a CPU) unless they say off.
"""
import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import timm
import torch
from torch.utils.data import DataLoader

from common import MEAN, ROOT, STD, BaselineDataset, baseline_transform, bench_data_dir, machine, model_specs, report

import train  # noqa: E402
from augment import create_transforms  # noqa: E402
from cache import DecodedCache  # noqa: E402
from dataset import MaskBaseDataset, PrefetchLoader, Subset, fast_collate  # noqa: E402
from loss import create_multi_head_loss  # noqa: E402
from model import build_model, predict  # noqa: E402
from precision import checked_compile, resolve_precision  # noqa: E402
from spec import TrainOptions  # noqa: E402

CONFIGS = {"reference": ("baseline loop + loader, fp32", None),
           "fp32": ("masktrain, --amp off --channels_last off", ["--amp", "off", "--channels_last", "off"]),
           "fp32_cl": ("masktrain, --amp off --channels_last", ["--amp", "off", "--channels_last"]),
           "bf16_cl": ("masktrain, --amp bf16 --channels_last", ["--amp", "bf16", "--channels_last"]),
           "fp32_nondet": ("masktrain, --amp off --channels_last off --deterministic off",
                           ["--amp", "off", "--channels_last", "off", "--deterministic", "off"]),
           "bf16_cl_nondet": ("masktrain, --amp bf16 --channels_last --deterministic off",
                              ["--amp", "bf16", "--channels_last", "--deterministic", "off"]),
           "auto": ("masktrain, defaults (--amp auto --channels_last auto)", []),
           "auto_cache": ("masktrain, defaults + --cache", ["--cache"]),
           "auto_compile": ("masktrain, defaults + --compile", ["--compile"])}


def reference_epoch(model, loader, criterion, optimizer):
    """The baseline's training loop, as written there (per-step .item() calls included)."""
    model.train()
    loss_value, matches = 0.0, 0
    for inputs, labels in loader:
        optimizer.zero_grad()
        outs = model(inputs)
        preds = torch.argmax(outs, dim=-1)
        loss = criterion(outs, labels)
        loss.backward()
        optimizer.step()
        loss_value += loss.item()
        matches += (preds == labels).sum().item()


def run_config(config, name, resize, table, rows, batch_size, workers, cache_dir):
    """(seconds per image of `rows` images after one warm-up batch, resolved precision, seconds of the warm-up
    batch, with `--compile`'s compile and its check against the eager model)."""
    torch.manual_seed(0)
    precision, compile_seconds = "fp32", 0.0
    if config == "reference":
        torch.use_deterministic_algorithms(False)
        model = timm.create_model(name, num_classes=18)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        criterion = torch.nn.CrossEntropyLoss()
        dataset = BaselineDataset(table["path"], table["class"], baseline_transform(resize))

        def epoch(indices):
            loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size, shuffle=True,
                                num_workers=workers)
            reference_epoch(model, loader, criterion, optimizer)
    else:
        model = build_model("single_head", name)
        flags = ["--epochs", "1", "--log_interval", "50", "--resize", *map(str, resize), *CONFIGS[config][1]]
        args = train.parse_args(flags)
        resolved = train.run_precision(args, model, torch.device("cpu"))
        train.set_deterministic(args.deterministic, torch.device("cpu"))
        model = model.to(memory_format=torch.channels_last if resolved.channels_last else torch.preserve_format)
        optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.0)
        criterion = create_multi_head_loss("cross_entropy", {"class": 18})
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        dataset = MaskBaseDataset(table=table)
        train_tf, val_tf = create_transforms("CustomAugmentation", resize)
        precision = ("fp32" if resolved.amp == "off" else resolved.amp) \
            + (", channels_last" if resolved.channels_last else "") \
            + ("" if torch.are_deterministic_algorithms_enabled() else ", not deterministic")
        if args.cache:
            dataset.cache = DecodedCache.build(table["path"], val_tf, cache_dir, workers)
        compiling = time.perf_counter()
        step_model, fallback = checked_compile(model, (batch_size, 3, *resize), torch.device("cpu"), resolved.amp,
                                               resolved.channels_last) if args.compile else (model, None)
        compile_seconds = time.perf_counter() - compiling  # the compile and its check against eager
        if fallback:
            print(f"{name}: {fallback}", flush=True)
            precision += "; compiled output wrong, timed eager"

        def epoch(indices):
            loader = DataLoader(Subset(dataset, indices, train_tf), batch_size, shuffle=True, num_workers=workers,
                                collate_fn=fast_collate)
            run = SimpleNamespace(train_model=step_model, train_loader=PrefetchLoader(loader, MEAN, STD, "cpu"),
                                  criterion=criterion, optimizer=optimizer, scaler=scaler, precision=resolved, ema=None,
                                  model=model, scheduler=None, options=TrainOptions.from_flags(vars(args)))
            train.train_epoch(run, 0, is_main=False)  # (the parts of a train.Run the epoch uses)
    started = time.perf_counter()
    epoch(list(range(batch_size)))
    warm_up = time.perf_counter() - started + compile_seconds
    started = time.perf_counter()
    epoch(list(range(batch_size, batch_size + rows)))
    return (time.perf_counter() - started) / rows, precision, warm_up


def inference_speed(config, name, resize, table, rows, batch_size, workers):
    """(forward passes per second of `predict` with flip TTA over `rows` images, resolved precision):
    inference.py's path, before (fp32, channels first) and after (the auto defaults)."""
    model = build_model("single_head", name).eval()
    args = train.parse_args(CONFIGS[config][1])
    amp, layout, _ = resolve_precision(model, args.amp, args.channels_last, torch.device("cpu"), resize, batch_size,
                                       train=False)
    model = model.to(memory_format=torch.channels_last if layout else torch.preserve_format)
    _, val_tf = create_transforms("CustomAugmentation", resize)
    loader = DataLoader(Subset(MaskBaseDataset(table=table), range(rows), val_tf), batch_size, num_workers=workers,
                        collate_fn=fast_collate)
    predict(model, PrefetchLoader(loader, MEAN, STD, "cpu"), amp, "hflip", channels_last=layout)
    started = time.perf_counter()
    predict(model, PrefetchLoader(loader, MEAN, STD, "cpu"), amp, "hflip", channels_last=layout)
    precision = ("fp32" if amp == "off" else amp) + (", channels_last" if layout else "")
    return 2 * rows / (time.perf_counter() - started), precision


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18:128x96", "efficientnet_lite0:224x224"],
                        metavar="NAME:HxW")
    default_configs = [c for c in CONFIGS if c != "auto_compile" and "nondet" not in c]
    parser.add_argument("--configs", nargs="+", default=default_configs,
                        choices=list(CONFIGS), help="auto_compile (its compile takes a minute) and the *_nondet "
                        "configurations (--deterministic's cost) are left out by default")
    parser.add_argument("--inference", action="store_true", help="also time inference before / after auto")
    parser.add_argument("--people", type=int, default=200)
    parser.add_argument("--steps", type=int, default=8, help="timed batches per configuration")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time the configurations this many times, interleaved; the table gives the mean")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="loader workers (the baseline's default: cores // 2)")
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "masktrain_bench"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_train.md"))
    args = parser.parse_args(argv)
    data_dir = bench_data_dir(args.people, args.work_dir)
    table = MaskBaseDataset(data_dir, check_images=False).table
    rows = args.steps * args.batch_size
    if len(table) < rows + args.batch_size:
        raise SystemExit(f"error: {len(table)} images are too few for {args.steps} steps of {args.batch_size}")
    lines = [f"End-to-end CPU training, batch {args.batch_size}, {args.steps} timed steps"
             + (f" x {args.rounds} interleaved rounds (images/s: their mean)" if args.rounds > 1 else "")
             + f", {args.workers} loader "
             f"worker(s), AdamW, {machine()}", "",
             "| model | input | configuration | resolved precision | images/s | ratio to reference | "
             "ratio to fp32 + channels_last | first batch s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, resize in model_specs(args.models):
        size = f"{resize[0]}x{resize[1]}"
        rounds, precisions, warm_ups = {config: [] for config in args.configs}, {}, {}
        for _ in range(args.rounds):
            for config in args.configs:
                seconds, precisions[config], warm_up = run_config(
                    config, name, resize, table, rows, args.batch_size, args.workers, Path(args.work_dir) / "cache")
                rounds[config].append(1 / seconds)
                warm_ups.setdefault(config, warm_up)
                print(f"{name} {size} {config} ({precisions[config]}): {1 / seconds:.1f} img/s", flush=True)
        speeds = {config: sum(values) / len(values) for config, values in rounds.items()}
        for config in args.configs:
            ratios = [f"{speeds[config] / speeds[base]:.2f}x" if base in speeds else "-"
                      for base in ("reference", "fp32_cl")]
            each = f" ({', '.join(f'{v:.1f}' for v in rounds[config])})" if args.rounds > 1 else ""
            lines.append(f"| {name} | {size} | {CONFIGS[config][0]} | {precisions[config]} | "
                         f"{speeds[config]:.1f}{each} | " + " | ".join(ratios) + f" | {warm_ups[config]:.1f} |")
    if args.inference:
        lines += ["", f"Inference (`predict` with flip TTA, batch {args.batch_size}, {rows} images), forward passes/s:",
                  "", "| model | input | configuration | resolved precision | passes/s | ratio to fp32 |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, resize in model_specs(args.models):
            size = f"{resize[0]}x{resize[1]}"
            speeds = {}
            for config in ("fp32", "auto"):
                speeds[config], precision = inference_speed(config, name, resize, table, rows, args.batch_size,
                                                            args.workers)
                print(f"inference {name} {size} {config} ({precision}): {speeds[config]:.1f} passes/s", flush=True)
                lines.append(f"| {name} | {size} | {CONFIGS[config][0]} | {precision} | {speeds[config]:.1f} | "
                             f"{speeds[config] / speeds['fp32']:.2f}x |")
    report(lines, args.out)


if __name__ == "__main__":
    main()
