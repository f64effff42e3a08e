"""Whole recipes on real faces: run each copy-paste command block of `benchmarks/recipes/*.sh` (the
same blocks the READMEs show) on ../shared/data/utkmask, time everything it does (cache, training of
every member, inference, ensembling) and score its submission.csv against eval_labels.csv.

    python benchmarks/bench_recipes.py --recipes reference same_budget --seeds 0 1
    python benchmarks/bench_recipes.py --recipes one_hour --seeds 0
    python benchmarks/bench_recipes.py --candidates same_budget_lite0 --seeds 0 1

A candidate is a row of benchmarks/recipes/candidates.yaml: a kept recipe (`base`) run with a few flags
changed (`flags`, given to the recipe as TRAIN_FLAGS, where they win over the recipe's own; `infer_flags`,
given as INFER_FLAGS to recipes that read it), and what was measured of it. `{face}`, `{weights}` and
`{detector}` in the flags stand for the shared face backbone's folder, efficientnet_lite0's weights file
and the YuNet face detector file.

Rows are appended to benchmarks/results/bench_recipes.csv with the machine (CPU flags) and the
precision the runs resolved; the table of all rows so far is rewritten beside it. Where one invocation
runs `reference` too, each row gets its minutes over the reference's of the same seed (`x_reference`):
issue #11's same budget is that ratio, measured side by side, at most 1.1."""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, commit, machine  # noqa: E402

from inference import read_labels  # noqa: E402
from metrics import score  # noqa: E402
from runs import atomic_write, write_csv  # noqa: E402

RECIPES_DIR = ROOT / "benchmarks" / "recipes"
UTKMASK = ROOT.parent / "shared" / "data" / "utkmask"
WEIGHTS = ROOT.parent / "shared" / "weights" / "efficientnet_lite0.safetensors"
FACE = ROOT.parent / "shared" / "weights" / "faceres_vggface2_mobilenetv1"
DETECTOR = ROOT.parent / "shared" / "weights" / "face_detection_yunet_2026may.onnx"
CANDIDATES = RECIPES_DIR / "candidates.yaml"


def read_candidates(path=CANDIDATES) -> dict:
    """name -> {base, flags, measured} from the candidates table."""
    import yaml
    rows = yaml.safe_load(Path(path).read_text()) or []
    return {row["name"]: row for row in rows}


def candidate_flags(row, weights=WEIGHTS, face=FACE, detector=DETECTOR, key="flags") -> str:
    """A candidate's train.py flags (`flags`) or inference.py flags (`infer_flags`), placeholders filled in."""
    return str(row.get(key, "")).format(face=face, weights=weights, detector=detector)


def recipe_script(recipes_dir, name) -> Path:
    """A kept recipe's script: recipes/NAME.sh, or one of the older full recipes in recipes/candidates/."""
    kept = Path(recipes_dir) / f"{name}.sh"
    return kept if kept.is_file() else Path(recipes_dir) / "candidates" / f"{name}.sh"


def run_block(script, seed, out, data, weights, train_flags="", infer_flags="") -> float:
    """Run a recipe `script` on `data` with its output in `out` (a new folder), `train_flags` added to its
    train.py commands and `infer_flags` to its inference.py command (where the script reads INFER_FLAGS);
    return its wall minutes."""
    if out.exists():
        raise SystemExit(f"error: {out} exists: give another --work_dir (runs never overwrite)")
    out.mkdir(parents=True)
    env = dict(os.environ, DATA=str(data), WEIGHTS=str(weights), FACE=str(FACE), OUT=str(out), SEED=str(seed),
               TRAIN_FLAGS=train_flags, INFER_FLAGS=infer_flags)
    started = time.time()
    with open(out / "log.txt", "w") as log:
        subprocess.run(["bash", str(script)], cwd=ROOT, env=env, check=True, stdout=log,
                       stderr=subprocess.STDOUT)
    return (time.time() - started) / 60


def score_submission(out, data) -> dict:
    """Macro F1 and per-head scores of out/submission.csv against data/eval_labels.csv."""
    submission = pd.read_csv(out / "submission.csv")
    labels = read_labels(Path(data) / "eval_labels.csv", submission["ImageID"])
    return score(labels, np.eye(18)[submission["ans"].to_numpy()])


def precision_of(out) -> str:
    """The --amp the recipe's runs resolved to (from their config.json)."""
    resolved = {json.loads(p.read_text()).get("amp_resolved", "?") for p in out.glob("*/config.json")}
    return "/".join(sorted(resolved)) or "?"


def with_reference_ratio(rows: list) -> list:
    """Each row of one invocation with `x_reference`: its minutes over those of the `reference` row of the
    same seed (NaN where that invocation did not run the reference)."""
    reference = {row["seed"]: row["minutes"] for row in rows if row["recipe"] == "reference"}
    return [{**row, "x_reference": row["minutes"] / reference.get(row["seed"], np.nan)} for row in rows]


def summary(results: pd.DataFrame) -> str:
    if "x_reference" not in results:
        results = results.assign(x_reference=np.nan)
    table = results.groupby(["recipe", "machine", "amp"]).agg(
        seeds=("seed", "count"), f1=("f1", "mean"), f1_std=("f1", "std"), gender_acc=("gender_acc", "mean"),
        age_f1=("age_f1", "mean"), minutes=("minutes", "mean"), x_reference=("x_reference", "mean")).reset_index()
    lines = ["| recipe | seeds | eval macro F1 | gender acc | age F1 | minutes | x reference (same run) | machine "
             "| amp |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in table.sort_values("f1").itertuples():
        spread = f" +- {r.f1_std:.3f}" if r.seeds > 1 else ""
        ratio = "" if np.isnan(r.x_reference) else f"{r.x_reference:.2f}"
        lines.append(f"| {r.recipe} | {r.seeds} | {r.f1:.3f}{spread} | {r.gender_acc:.3f} | {r.age_f1:.3f} | "
                     f"{r.minutes:.1f} | {ratio} | {r.machine} | {r.amp} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", help=f"names of {RECIPES_DIR}/*.sh (default: reference and "
                        "same_budget, or none where --candidates are given)")
    parser.add_argument("--candidates", nargs="*", default=[], help=f"names of rows of {CANDIDATES}")
    parser.add_argument("--recipes_dir", default=str(RECIPES_DIR))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--data", default=str(UTKMASK), help="a folder with train/, eval/ and eval_labels.csv")
    parser.add_argument("--weights", default=str(WEIGHTS), help="efficientnet_lite0 weights")
    parser.add_argument("--work_dir", default=str(ROOT / "benchmarks" / "work" / "recipes"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "bench_recipes.csv"))
    args = parser.parse_args(argv)
    if args.recipes is None:
        args.recipes = [] if args.candidates else ["reference", "same_budget"]
    if not (Path(args.data) / "eval_labels.csv").is_file() or not Path(args.weights).is_file():
        raise SystemExit(f"error: needs {args.data}/eval_labels.csv and {args.weights} (the shared benchmark data)")
    candidates = read_candidates()
    unknown = [name for name in args.candidates if name not in candidates]
    if unknown:
        raise SystemExit(f"error: no candidate {', '.join(unknown)} in {CANDIDATES}")
    blocks = {recipe: (Path(args.recipes_dir) / f"{recipe}.sh", "", "") for recipe in args.recipes}
    blocks.update({name: (recipe_script(args.recipes_dir, candidates[name]["base"]),
                          candidate_flags(candidates[name], args.weights),
                          candidate_flags(candidates[name], args.weights, key="infer_flags"))
                   for name in args.candidates})
    missing = [str(path) for path, _, _ in blocks.values() if not path.is_file()]
    if missing:
        raise SystemExit(f"error: no recipe {', '.join(missing)}")
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    previous = pd.read_csv(results_path) if results_path.is_file() else pd.DataFrame()
    rows = []
    for seed in args.seeds:
        for recipe, (script, train_flags, infer_flags) in blocks.items():
            out = Path(args.work_dir) / f"{recipe}_s{seed}"
            minutes = run_block(script, seed, out, args.data, args.weights, train_flags, infer_flags)
            scores = score_submission(out, args.data)
            row = dict(recipe=recipe, seed=seed, f1=scores["f1"], mask_acc=scores["mask_acc"],
                       gender_acc=scores["gender_acc"], age_f1=scores["age_f1"], minutes=minutes,
                       machine=machine(), amp=precision_of(out), commit=commit(),
                       out=os.path.relpath(out, ROOT))  # no path of one machine
            print(json.dumps(row), flush=True)
            rows.append(row)
            write_csv(results_path, pd.concat([previous, pd.DataFrame(with_reference_ratio(rows))],
                                              ignore_index=True))
    table = summary(pd.read_csv(results_path))
    print(table)
    atomic_write(results_path.with_suffix(".md"), lambda tmp: Path(tmp).write_text(table + "\n"))


if __name__ == "__main__":
    main()
