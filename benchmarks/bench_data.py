"""Loader throughput, images per second delivered as ready (normalised float) batches of 64 at 224x224
with crop, resize and flip, for (a) the baseline's way, (b) this toolkit's uint8 path and (c) the
decoded cache, each at several worker counts; plus peak memory of (b) and (c).

    python benchmarks/bench_data.py                       # 200 people (1,400 images of 512x384)
    python benchmarks/bench_data.py --people 8 --epochs 1 # a smoke run

Each measurement runs in a fresh process (forked from a server that imported torch once), so its peak
memory is its own; the table gives ratios to (a) at the same worker count."""
import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from common import MEAN, ROOT, STD, BaselineDataset, baseline_transform, bench_data_dir, machine, peak_rss_mb, report

from augment import create_transforms  # noqa: E402
from cache import DecodedCache  # noqa: E402
from dataset import MaskBaseDataset, PrefetchLoader, Subset, fast_collate  # noqa: E402

LOADERS = {"a": "baseline: PIL, float ToTensor+Normalize per image, float collate",
           "b": "masktrain: uint8 decode/crop/resize/flip, uint8 collate (normalised on the GPU)",
           "c": "masktrain + decoded cache (normalised on the GPU)",
           "b_cpu": "masktrain, normalised per batch on the CPU (CPU-only training)",
           "c_cpu": "masktrain + decoded cache, normalised on the CPU"}


def make_loader(kind, data_dir, workers, batch_size, resize, cache_dir):
    dataset = MaskBaseDataset(data_dir, check_images=False)
    if kind == "a":
        ref = BaselineDataset(dataset.table["path"], dataset.table["class"], baseline_transform(resize))
        return DataLoader(ref, batch_size, shuffle=True, num_workers=workers)
    train_tf, val_tf = create_transforms("CustomAugmentation", resize)
    if kind.startswith("c"):
        dataset.cache = DecodedCache.build(dataset.table["path"], val_tf, cache_dir, workers)
    subset = Subset(dataset, range(len(dataset)), train_tf)
    loader = DataLoader(subset, batch_size, shuffle=True, num_workers=workers, collate_fn=fast_collate)
    return PrefetchLoader(loader, MEAN, STD, "cpu") if kind.endswith("_cpu") else loader


def measure(kind, data_dir, workers, batch_size, resize, epochs, cache_dir) -> dict:
    """Images per second over `epochs` passes (after building the loader and any cache). Without a
    GPU, (b) and (c) are timed up to the uint8 batch the prefetcher moves to the GPU, where it is
    normalised; the *_cpu rows add that normalisation on the CPU."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    loader = make_loader(kind, data_dir, workers, batch_size, resize, cache_dir)
    setup = time.perf_counter() - started
    images, started = 0, time.perf_counter()
    for _ in range(epochs):
        for batch, _ in loader:
            assert batch.dtype in (torch.float32, torch.uint8) and batch.shape[-2:] == tuple(resize)
            images += len(batch)
    seconds = time.perf_counter() - started
    return dict(kind=kind, workers=workers, images=images, seconds=seconds, images_per_second=images / seconds,
                setup_seconds=setup, peak_rss_mb=peak_rss_mb())


def measure_into(pipe, start_method, *args):
    """measure(*args), its result sent down `pipe` (the body of one measurement's process). Its loader
    workers start as they would in a fresh interpreter (`start_method`), not from the forkserver."""
    multiprocessing.set_start_method(start_method, force=True)
    pipe.send(measure(*args))


def measure_in_fresh_process(*args) -> dict:
    """measure(*args) in a new process forked from the forkserver, which has imported this module's
    dependencies once (starting five interpreters cost the smoke run 20 s of its 31)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "timm", "common", "augment", "cache", "dataset"])
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=measure_into, args=(send, multiprocessing.get_start_method(), *args))
    process.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        result = None
    process.join()
    if result is None or process.exitcode != 0:
        raise SystemExit(f"error: measuring loader ({args[0]}) with {args[2]} workers failed (exit {process.exitcode})")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--resize", type=int, nargs=2, default=[224, 224])
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "masktrain_bench"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_data.md"))
    args = parser.parse_args(argv)
    data_dir = bench_data_dir(args.people, args.work_dir)
    cache_dir = Path(args.work_dir) / "cache"
    DecodedCache.build(MaskBaseDataset(data_dir, check_images=False).table["path"],
                       create_transforms("CustomAugmentation", args.resize)[1], cache_dir, max(args.workers))
    rows = []
    for workers in args.workers:
        for kind in LOADERS:
            rows.append(measure_in_fresh_process(kind, data_dir, workers, args.batch_size, args.resize, args.epochs,
                                                 cache_dir))
            print(f"{kind} workers={workers}: {rows[-1]['images_per_second']:.0f} img/s", flush=True)
    reference = {r["workers"]: r["images_per_second"] for r in rows if r["kind"] == "a"}
    peak = {(r["kind"], r["workers"]): r["peak_rss_mb"] for r in rows}
    lines = [f"Loader throughput, {args.people * 7} images of 512x384, batches of {args.batch_size} at "
             f"{args.resize[0]}x{args.resize[1]} (crop, resize, flip), {args.epochs} epochs, {machine()}", "",
             "| loader | workers | images/s | ratio to (a) | peak RSS MiB |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| ({r['kind']}) {LOADERS[r['kind']]} | {r['workers']} | {r['images_per_second']:.0f} | "
                     f"{r['images_per_second'] / reference[r['workers']]:.2f}x | {r['peak_rss_mb']:.0f} |")
    for workers in args.workers:
        lines.append(f"\nPeak memory with the cache / without, {workers} workers: "
                     f"{peak[('c_cpu', workers)] / peak[('b_cpu', workers)]:.2f}x")
    report(lines, args.out)


if __name__ == "__main__":
    main()
