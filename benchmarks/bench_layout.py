"""Pure model-step speed (forward + backward + AdamW on one resident batch, no data loading) by
precision and memory layout: the measurement behind `--amp auto` and `--channels_last auto`; with
`--probe`, also what `--amp auto`'s own timing (model.faster_cpu_precision) picks for training and
inference of each model on this CPU; with `--freeze`, the same with the backbone's first stages frozen
(train.py --freeze: their backward pass is skipped).

    python benchmarks/bench_layout.py                                             # this CPU as it is
    python benchmarks/bench_layout.py --models efficientnet_lite0:160x160 --amp off --freeze none 5
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_layout.py --out ...  # as AVX2-only
"""
import argparse
import time

import torch

from common import ROOT, machine, model_specs, report

from model import build_model, freeze  # noqa: E402
from precision import PROBE_MAX_BATCH, autocast, cpu_has_native_bf16, faster_cpu_precision  # noqa: E402


def step_speed(name, size, amp, channels_last, batch_size, steps, frozen="none") -> float:
    """Images/s of training steps of a three-head model on a random batch (after 2 warm-up steps), its
    backbone frozen as train.py's --freeze `frozen`."""
    torch.manual_seed(0)
    model = build_model("three_head", name)
    freeze(model, frozen)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    images = torch.randn(batch_size, 3, *size).contiguous(memory_format=layout)
    targets = [torch.randint(0, n, (batch_size,)) for n in (3, 2, 3)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    device = torch.device("cpu")

    def step():
        with autocast(device, amp):
            outputs = model(images)
            loss = sum(torch.nn.functional.cross_entropy(outputs[h].float(), t)
                       for h, t in zip(("mask", "gender", "age"), targets, strict=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * steps / (time.perf_counter() - started)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18:128x96", "efficientnet_lite0:128x128"],
                        metavar="NAME:HxW")
    parser.add_argument("--amp", nargs="+", default=["off", "bf16"], choices=["off", "bf16"])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--freeze", nargs="+", default=["none"], metavar="SPEC",
                        help="train.py --freeze settings to time (none, all or N last stages trained)")
    parser.add_argument("--probe", action="store_true", help="add what --amp auto picks (CPUs with native bf16)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_layout.md"))
    args = parser.parse_args(argv)
    lines = [f"Model step only (three heads, AdamW, batch {args.batch_size}, {args.steps} timed steps), "
             f"{machine()}", "",
             "| model | input | --freeze | precision | channels first img/s | channels_last img/s | "
             "channels_last speed-up |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, size in model_specs(args.models):
        for frozen in args.freeze:
            for amp in args.amp:
                first, last = (step_speed(name, size, amp, cl, args.batch_size, args.steps, frozen)
                               for cl in (False, True))
                print(f"{name} freeze {frozen} {amp}: {first:.1f} / {last:.1f} img/s", flush=True)
                lines.append(f"| {name} | {size[0]}x{size[1]} | {frozen} | {'fp32' if amp == 'off' else amp} | "
                             f"{first:.1f} | {last:.1f} | {last / first:.2f}x |")
    if args.probe and cpu_has_native_bf16():
        train_batch, infer_batch = (min(args.batch_size, PROBE_MAX_BATCH[mode]) for mode in (True, False))
        lines += ["", "What `--amp auto` picks here (its own timing: 2 rounds after a warm-up of forward + backward on "
                  f"a copy of the model, batch {train_batch}, for training; forward only, batch {infer_batch}, for "
                  "inference; channels_last):", "",
                  "| model | input | --freeze | training fp32 / bf16 img/s | auto trains in | "
                  "inference fp32 / bf16 img/s | auto predicts in |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, size in model_specs(args.models):
            for frozen in args.freeze:
                net = build_model("three_head", name)
                freeze(net, frozen)
                (train_pick, train_speed), (infer_pick, infer_speed) = (
                    faster_cpu_precision(net, size, args.batch_size, train=train, channels_last=True)
                    for train in (True, False))
                lines.append(f"| {name} | {size[0]}x{size[1]} | {frozen} | {train_speed['off']:.1f} / "
                             f"{train_speed['bf16']:.1f} | {'fp32' if train_pick == 'off' else 'bf16'} | "
                             f"{infer_speed['off']:.1f} / {infer_speed['bf16']:.1f} | "
                             f"{'fp32' if infer_pick == 'off' else 'bf16'} |")
    report(lines, args.out)


if __name__ == "__main__":
    main()
