"""How well audit.py finds label errors: inject known errors into a copy of utkmask's train folder
(gender flips, moves to a neighbouring age group, incorrect_mask <-> normal swaps), train k-fold with a
cheap recipe, audit, and report precision / recall per kind; then train the same recipe on the clean,
the noisy and the noisy-plus-relabel-draft folders and score each on utkmask eval.

    python benchmarks/bench_audit.py                      # needs ../shared/data/utkmask and the lite0 weights
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common import ROOT, machine, report

from dataset import PERSON_FOLDER, AgeLabels  # noqa: E402

SHARED = ROOT.parent / "shared"
UTKMASK = SHARED / "data" / "utkmask"
WEIGHTS = SHARED / "weights" / "efficientnet_lite0.safetensors"
AGE_RANGES = ((18, 29), (30, 59), (60, 80))


def inject(clean, noisy, seed, gender=0.03, age=0.03, swap=0.02) -> pd.DataFrame:
    """Copy `clean` to `noisy` with errors in disjoint random people; returns what was injected."""
    shutil.copytree(clean, noisy)
    rng = np.random.default_rng(seed)
    people = sorted(p.name for p in (noisy / "images").iterdir() if p.is_dir())
    counts = [round(len(people) * share) for share in (gender, age, swap)]
    chosen = rng.permutation(people)
    rows = []
    for kind, names in zip(("gender", "age", "mask swap"), np.split(chosen[: sum(counts)], np.cumsum(counts)[:2]),
                           strict=True):
        for name in names:
            person_id, sex, race, years = PERSON_FOLDER.match(name).groups()
            folder = noisy / "images" / name
            if kind == "gender":
                folder.rename(folder.with_name(f"{person_id}_{'female' if sex == 'male' else 'male'}_{race}_{years}"))
            elif kind == "age":
                group = int(AgeLabels.from_number(int(years)))
                target = 1 if group != 1 else int(rng.choice([0, 2]))
                low, high = AGE_RANGES[target]
                new_age = int(rng.integers(low, low + 5)) if target > group else int(rng.integers(high - 4, high + 1))
                folder.rename(folder.with_name(f"{person_id}_{sex}_{race}_{new_age}"))
            else:
                files = {p.stem.lower(): p for p in folder.iterdir()}
                incorrect, normal = files["incorrect_mask"], files["normal"]
                tmp = folder / f"swap{incorrect.suffix}"
                incorrect.rename(tmp)
                normal.rename(folder / f"incorrect_mask{normal.suffix}")
                tmp.rename(folder / f"normal{incorrect.suffix}")
            rows.append(dict(kind=kind, id=person_id))
    return pd.DataFrame(rows)


def run(command, log):
    """Run a project command, its output appended to `log`; stop the benchmark if it fails."""
    with open(log, "a") as out:
        out.write(f"$ {' '.join(map(str, command))}\n")
        out.flush()
        subprocess.run([sys.executable, *map(str, command)], check=True, stdout=out, stderr=subprocess.STDOUT)


def scores(suspects, injected, kind, min_score) -> dict:
    """Precision and recall of one kind's injected errors above the threshold and in the top K."""
    truth = set(injected.loc[injected["kind"] == kind, "id"])
    found = suspects[suspects["kind"] == kind].sort_values("score", ascending=False)
    above = set(found.loc[found["score"] >= min_score, "id"])
    top = set(found["id"].head(len(truth)))
    hits_above, hits_top = len(above & truth), len(top & truth)
    return dict(kind=kind, injected=len(truth), suspects=len(found), above=len(above),
                precision_above=hits_above / max(len(above), 1), recall_above=hits_above / max(len(truth), 1),
                precision_top=hits_top / max(len(top), 1), recall_top=hits_top / max(len(truth), 1))


def train_and_score(name, data_dir, recipe, work, log, relabel=None) -> dict:
    """Train `recipe` on `data_dir` and score the best checkpoint on utkmask eval."""
    extra = ["--relabel", relabel] if relabel else []
    run([ROOT / "train.py", "--data_dir", data_dir, "--model_dir", work / "runs", "--name", name, *recipe, *extra], log)
    out = work / "eval" / name
    run([ROOT / "inference.py", "--model_dir", work / "runs" / name, "--data_dir", UTKMASK / "eval",
         "--output_dir", out, "--labels", UTKMASK / "eval_labels.csv", "--num_workers", "0"], log)
    return json.loads((out / "submission_scores.json").read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "masktrain_audit"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--min_score", type=float, default=0.5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_audit.md"))
    args = parser.parse_args(argv)
    if not (UTKMASK / "train").is_dir() or not WEIGHTS.is_file():
        raise SystemExit(f"error: needs {UTKMASK} and {WEIGHTS}")
    work = Path(args.work_dir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    log = work / "log.txt"
    started = time.time()
    injected = inject(UTKMASK / "train", work / "noisy", args.seed)
    recipe = ["--model", "efficientnet_lite0", "--pretrained", WEIGHTS, "--resize", args.size, args.size,
              "--crop", "1", "1", "--epochs", args.epochs, "--batch_size", "64", "--lr", "1e-3", "--cache",
              "--cache_dir", work / "cache", "--num_workers", "0", "--seed", args.seed]
    run([ROOT / "train.py", "--data_dir", work / "noisy", "--model_dir", work / "runs", "--name", "kfold",
         "--n_folds", args.n_folds, *recipe], log)
    run([ROOT / "audit.py", work / "runs" / "kfold_cv.json", "--output_dir", work / "audit", "--min_score",
         args.min_score, "--top", "16"], log)
    suspects = pd.read_csv(work / "audit" / "audit.csv", dtype={"id": str})
    table = pd.DataFrame([scores(suspects, injected, kind, args.min_score) for kind in ("gender", "age", "mask swap")])
    audit_minutes = (time.time() - started) / 60
    evals = {name: train_and_score(name, folder, recipe, work, log, relabel) for name, folder, relabel in (
        ("clean", UTKMASK / "train", None), ("noisy", work / "noisy", None),
        ("noisy_relabelled", work / "noisy", work / "audit" / "relabel_draft.csv"))}
    not_injected = suspects[~suspects["id"].isin(set(injected["id"]))]
    # the contact sheets show UTKFace faces: they stay in the work folder, never in the project
    run_not_injected_sheet(work, not_injected, work / "audit" / "not_injected.png")
    cost = evals["clean"]["f1"] - evals["noisy"]["f1"]
    recovered = (evals["noisy_relabelled"]["f1"] - evals["noisy"]["f1"]) / cost if cost > 0 else float("nan")
    lines = [f"audit.py on utkmask train with injected errors (seed {args.seed}): {args.n_folds}-fold "
             f"efficientnet_lite0 (shared weights), {args.size}x{args.size}, --crop 1 1, {args.epochs} epochs, "
             f"--amp auto; default --min_score {args.min_score}; {machine()}", "",
             "| kind | injected | suspects | above threshold | precision | recall | precision top-K | recall top-K |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r.kind} | {r.injected} | {r.suspects} | {r.above} | {r.precision_above:.2f} | {r.recall_above:.2f} "
              f"| {r.precision_top:.2f} | {r.recall_top:.2f} |" for r in table.itertuples()]
    lines += ["", f"K = the number injected of that kind. Injection, k-fold training and audit: {audit_minutes:.1f} "
              f"minutes. Suspects that were not injected: {len(not_injected)} "
              f"({', '.join(f'{k} {v}' for k, v in not_injected['kind'].value_counts().items())}); contact sheets "
              f"(UTKFace faces, kept out of the project): {work / 'audit' / 'audit.png'}, "
              f"{work / 'audit' / 'not_injected.png'}.", "",
              "Same recipe trained on the whole folder (20% of the people held out for the best epoch), scored on "
              "utkmask eval:", "",
              "| train folder | eval macro F1 | mask acc | gender acc | age acc |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {s['f1']:.4f} | {s['mask_acc']:.4f} | {s['gender_acc']:.4f} | {s['age_acc']:.4f} |"
              for name, s in evals.items()]
    lines += ["", f"The noise cost {cost:+.4f} macro F1; the relabel draft recovered {recovered:.0%} of it."]
    report(lines, args.out)


def run_not_injected_sheet(work, not_injected, out):
    """The contact sheet of the top suspects that were not injected (UTKFace's own label errors?)."""
    from audit import audit_table, contact_sheet, join, out_of_fold, probability_files
    from dataset import decode_multi_class
    files, configs = probability_files([work / "runs" / "kfold_cv.json"])
    data = join(audit_table(configs[0]["data_dir"], configs[0]["age_bins"]), out_of_fold(files))
    data["mask"], data["gender_label"], data["age_label"] = decode_multi_class(data["ans"].to_numpy())
    contact_sheet(out, not_injected.fillna(""), data, top=16)


if __name__ == "__main__":
    main()
