"""Quality on real faces: train recipes on ../shared/data/utkmask (UTKFace crops in the competition
layout) with the shared pretrained efficientnet_lite0, predict its eval folder with inference.py,
score against eval_labels.csv (without and with flip TTA), and print macro F1, per-head accuracy,
age macro F1 and wall time (training + that inference).

    python benchmarks/bench_quality.py                                  # the two references + recommended
    python benchmarks/bench_quality.py --recipes recommended --seeds 0 1
    python benchmarks/bench_quality.py --list                           # every recipe's flags

Every recipe shares the backbone, input size, epochs and batch size (COMMON); results are appended
to benchmarks/results/bench_quality.csv and the table of all results so far is rewritten."""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
UTKMASK = SHARED / "data" / "utkmask"
WEIGHTS = SHARED / "weights" / "efficientnet_lite0.safetensors"

COMMON = ["--model", "efficientnet_lite0", "--pretrained", str(WEIGHTS), "--resize", "128", "128", "--epochs", "3",
          "--batch_size", "64", "--optimizer", "adamw", "--scheduler", "cosine", "--lr", "1e-3",
          "--amp", "auto", "--channels_last", "auto", "--cache", "--num_workers", "0"]
THREE_HEADS = ["--kind", "three_head", "--dataset", "MultiLabelDataset"]
FOCAL = THREE_HEADS + ["--criterion", "focal", "--head_weights", "age=1.5"]
NO_CROP = ["--crop", "1", "1"]
RECIPES = {
    # the two references of the issue
    "ref_18class_ce_image_split": ["--kind", "single_head", "--criterion", "cross_entropy",
                                   "--dataset", "MaskBaseDataset"],
    "ref_3head_focal_age1.5": FOCAL,
    # the same references without the centre crop that cuts the chin off aligned faces (fair to each other)
    "ref_18class_ce_image_split_nocrop": ["--kind", "single_head", "--criterion", "cross_entropy",
                                          "--dataset", "MaskBaseDataset"] + NO_CROP,
    # candidates: one change at a time on top of the focal three-head reference
    "3head_focal_nocrop": FOCAL + NO_CROP,
    "3head_ce_nocrop": THREE_HEADS + ["--criterion", "cross_entropy"] + NO_CROP,
    "3head_focal_nocrop_lr3e-3": FOCAL + NO_CROP + ["--lr", "3e-3"],
    "3head_focal_nocrop_agesampler": FOCAL + NO_CROP + ["--sampler", "age"],
    "3head_focal+f1_nocrop": THREE_HEADS + ["--criterion", "focal:0.6+f1:0.4", "--head_weights", "age=1.5"] + NO_CROP,
    "3head_ls_nocrop": THREE_HEADS + ["--criterion", "label_smoothing", "--head_weights", "age=1.5"] + NO_CROP,
    "3head_focal_nocrop_agesoft3": FOCAL + NO_CROP + ["--age_soft", "3"],
}
RECOMMENDED = "3head_focal_nocrop"


def run_recipe(name, seed, work_dir) -> list:
    """Train recipe `name` once; score the eval folder without and with flip TTA (two rows)."""
    run_name = f"{name}_s{seed}"
    model_dir = Path(work_dir) / "runs"
    started = time.time()
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--data_dir", str(UTKMASK / "train"),
                    "--model_dir", str(model_dir), "--name", run_name, "--seed", str(seed),
                    "--cache_dir", str(Path(work_dir) / "cache"), *COMMON, *RECIPES[name]], check=True,
                   stdout=subprocess.DEVNULL)
    train_minutes = (time.time() - started) / 60
    run_dir = max(model_dir.glob(f"{run_name}*/config.json"), key=lambda p: p.stat().st_mtime).parent
    out = Path(work_dir) / "predictions"
    rows = []
    for tta in ("none", "hflip", "hflip_cal"):
        started = time.time()
        name_tta = f"{run_dir.name}_{tta}.csv"
        subprocess.run([sys.executable, str(ROOT / "inference.py"), "--model_dir", str(run_dir),
                        "--data_dir", str(UTKMASK / "eval"), "--output_dir", str(out), "--name", name_tta,
                        "--labels", str(UTKMASK / "eval_labels.csv"), "--tta", tta.removesuffix("_cal"),
                        "--num_workers", "0", "--overwrite"] + (["--calibrate"] if tta.endswith("_cal") else []),
                       check=True, stdout=subprocess.DEVNULL)
        scores = json.loads((out / name_tta.replace(".csv", "_scores.json")).read_text())
        rows.append(dict(recipe=name, seed=seed, tta=tta, f1=scores["f1"], mask_acc=scores["mask_acc"],
                         gender_acc=scores["gender_acc"], age_acc=scores["age_acc"], age_f1=scores["age_f1"],
                         minutes=train_minutes + (time.time() - started) / 60, train_minutes=train_minutes,
                         run=os.path.relpath(run_dir, ROOT)))  # no path of one machine
    return rows


def summary(results: pd.DataFrame) -> str:
    scoring = {"none": "", "hflip": " + TTA hflip", "hflip_cal": " + TTA hflip + --calibrate"}
    results = results.assign(recipe=results["recipe"] + results["tta"].map(scoring))
    table = results.groupby("recipe").agg(seeds=("seed", "count"), f1=("f1", "mean"), f1_std=("f1", "std"),
                                          mask_acc=("mask_acc", "mean"), gender_acc=("gender_acc", "mean"),
                                          age_f1=("age_f1", "mean"), minutes=("minutes", "mean"))
    lines = ["| recipe | seeds | eval macro F1 | mask acc | gender acc | age F1 | minutes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for recipe, r in table.sort_values("f1").iterrows():
        spread = f" +- {r.f1_std:.3f}" if r.seeds > 1 else ""
        lines.append(f"| {recipe} | {int(r.seeds)} | {r.f1:.3f}{spread} | {r.mask_acc:.3f} | {r.gender_acc:.3f} | "
                     f"{r.age_f1:.3f} | {r.minutes:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=[list(RECIPES)[0], list(RECIPES)[1], RECOMMENDED],
                        choices=list(RECIPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--work_dir", default=str(ROOT / "benchmarks" / "work"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "bench_quality.csv"))
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    if args.list:
        for name, flags in RECIPES.items():
            print(f"{name}: train.py {' '.join(COMMON + flags)}")
        return
    if not (UTKMASK / "eval_labels.csv").is_file() or not WEIGHTS.is_file():
        raise SystemExit(f"error: needs {UTKMASK} and {WEIGHTS} (the shared benchmark data)")
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for name in args.recipes:
            rows = run_recipe(name, seed, args.work_dir)
            print("\n".join(json.dumps(row) for row in rows), flush=True)
            previous = pd.read_csv(results_path) if results_path.is_file() else pd.DataFrame()
            pd.concat([previous, pd.DataFrame(rows)], ignore_index=True).to_csv(results_path, index=False)
    table = summary(pd.read_csv(results_path))
    print(table)
    results_path.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
