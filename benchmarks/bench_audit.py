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

import audit  # noqa: E402
from dataset import PERSON_FOLDER, AgeLabels  # noqa: E402

SHARED = ROOT.parent / "shared"
UTKMASK = SHARED / "data" / "utkmask"
WEIGHTS = SHARED / "weights" / "efficientnet_lite0.safetensors"
AGE_RANGES = ((18, 29), (30, 59), (60, 80))


def inject(clean, noisy, seed, gender=0.03, age=0.03, swap=0.02) -> pd.DataFrame:
    """Copy `clean` to `noisy` with errors in disjoint random people; returns what was injected (kind,
    id, the person's clean and noisy folder names)."""
    shutil.copytree(clean, noisy)
    rng = np.random.default_rng(seed)
    people = sorted(p.name for p in (noisy / "images").iterdir() if p.is_dir())
    counts = [round(len(people) * share) for share in (gender, age, swap)]
    chosen = rng.permutation(people)
    rows = []
    for kind, names in zip(("gender", "age", "mask swap"), np.split(chosen[: sum(counts)], np.cumsum(counts)[:2]),
                           strict=True):
        for name in map(str, names):
            person_id, sex, race, years = PERSON_FOLDER.match(name).groups()
            folder, new_name = noisy / "images" / name, name
            if kind == "gender":
                new_name = f"{person_id}_{'female' if sex == 'male' else 'male'}_{race}_{years}"
            elif kind == "age":
                group = int(AgeLabels.from_number(int(years)))
                target = 1 if group != 1 else int(rng.choice([0, 2]))
                low, high = AGE_RANGES[target]
                new_age = int(rng.integers(low, low + 5)) if target > group else int(rng.integers(high - 4, high + 1))
                new_name = f"{person_id}_{sex}_{race}_{new_age}"
            else:
                files = {p.stem.lower(): p for p in folder.iterdir()}
                incorrect, normal = files["incorrect_mask"], files["normal"]
                tmp = folder / f"swap{incorrect.suffix}"
                incorrect.rename(tmp)
                normal.rename(folder / f"incorrect_mask{normal.suffix}")
                tmp.rename(folder / f"normal{incorrect.suffix}")
            folder.rename(folder.with_name(new_name))
            rows.append(dict(kind=kind, id=person_id, clean=name, noisy=new_name))
    return pd.DataFrame(rows)


def noisy_image_id(image_id, injected) -> str:
    """Where a clean image (person/file) lies in the noisy folder: its person's folder renamed, and
    incorrect_mask <-> normal exchanged for a swapped person (the suffix travels with the image)."""
    person, file = image_id.split("/")
    row = injected.loc[injected["clean"] == person]
    if row.empty:
        return image_id
    row = row.iloc[0]
    stem, suffix = file.rsplit(".", 1)
    if row["kind"] == "mask swap" and stem.lower() in ("incorrect_mask", "normal"):
        stem = "normal" if stem.lower() == "incorrect_mask" else "incorrect_mask"
    return f"{row['noisy']}/{stem}.{suffix}"


def labels_only_oof(cv_json, noisy, injected, out_dir) -> list:
    """A k-fold run on the clean folder, its out-of-fold probabilities moved onto the noisy folder:
    each image keeps its prediction, `ans` becomes the noisy folder's label. The models never saw the
    injected labels, so this is what a strong recipe can find at best, without training it again."""
    from audit import audit_table
    labels = audit_table(noisy)["class"]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for k, fold in enumerate(json.loads(Path(cv_json).read_text())["folds"]):
        frame = pd.read_csv(Path(fold) / "val_probs.csv")
        frame["ImageID"] = [noisy_image_id(i, injected) for i in frame["ImageID"]]
        frame["ans"] = labels.reindex(frame["ImageID"]).to_numpy()
        if frame["ans"].isna().any():
            raise SystemExit(f"error: {cv_json} does not come from utkmask's train folder")
        files.append(out_dir / f"fold{k}_val_probs.csv")
        frame.astype({"ans": int}).to_csv(files[-1], index=False)
    return files


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
    parser.add_argument("--min_score", nargs="+", default=audit.build_parser().get_default("min_score"),
                        help="audit.py's --min_score: the draft's and the table's thresholds")
    parser.add_argument("--train_flags", default="", help="more train.py flags for the k-fold and retrain runs, "
                        "e.g. '--age_soft 3 --age_years 0.5'")
    parser.add_argument("--oof", metavar="CV_JSON", help="audit this k-fold run of the clean train folder, its "
                        "out-of-fold probabilities moved onto the noisy folder, instead of training on the noisy one")
    parser.add_argument("--skip_retrain", action="store_true", help="only the audit (no eval F1 of the drafts)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_audit.md"))
    args = parser.parse_args(argv)
    if not (UTKMASK / "train").is_dir() or not WEIGHTS.is_file():
        raise SystemExit(f"error: needs {UTKMASK} and {WEIGHTS}")
    if args.oof and not Path(args.oof).is_file():
        raise SystemExit(f"error: --oof: {args.oof} not found")
    work = Path(args.work_dir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    log = work / "log.txt"
    started = time.time()
    injected = inject(UTKMASK / "train", work / "noisy", args.seed)
    recipe = ["--model", "efficientnet_lite0", "--pretrained", WEIGHTS, "--resize", args.size, args.size,
              "--crop", "1", "1", "--epochs", args.epochs, "--batch_size", "64", "--lr", "1e-3", "--cache",
              "--cache_dir", work / "cache", "--num_workers", "0", "--seed", args.seed, *args.train_flags.split()]
    if args.oof:
        inputs = labels_only_oof(args.oof, work / "noisy", injected, work / "oof")
        config = json.loads((Path(json.loads(Path(args.oof).read_text())["folds"][0]) / "config.json").read_text())
        source = (f"the out-of-fold probabilities of {args.oof} (trained on the clean folder: {config['n_folds']}-fold "
                  f"{config['model']}, {config['resize'][0]}x{config['resize'][1]}, {config['epochs']} epochs, "
                  f"--age_soft {config['age_soft']}, --amp {config.get('amp_resolved')}) moved onto the noisy folder; "
                  "the models never saw the injected labels, so this is the best such a recipe can find")
    else:
        run([ROOT / "train.py", "--data_dir", work / "noisy", "--model_dir", work / "runs", "--name", "kfold",
             "--n_folds", args.n_folds, *recipe], log)
        inputs = [work / "runs" / "kfold_cv.json"]
        source = (f"{args.n_folds}-fold efficientnet_lite0 (shared weights), {args.size}x{args.size}, --crop 1 1, "
                  f"{args.epochs} epochs, --amp auto{' ' + args.train_flags if args.train_flags else ''}, "
                  "trained on the noisy folder")
    run([ROOT / "audit.py", *inputs, "--data_dir", work / "noisy", "--output_dir", work / "audit", "--min_score",
         *args.min_score, "--top", "8"], log)
    thresholds = audit.min_scores(args.min_score)
    suspects = pd.read_csv(work / "audit" / "audit.csv", dtype={"id": str})
    table = pd.DataFrame([scores(suspects, injected, kind, thresholds[kind])
                          for kind in ("gender", "age", "mask swap")])
    audit_minutes = (time.time() - started) / 60
    not_injected = suspects[~suspects["id"].isin(set(injected["id"]))]
    # the contact sheets show UTKFace faces: they stay in the work folder, never in the project
    not_injected_sheet(inputs, work / "noisy", not_injected, work / "audit" / "not_injected.png")
    lines = [f"audit.py on utkmask train with injected errors (seed {args.seed}): {source}; --min_score "
             f"{' '.join(args.min_score)}; {machine()}", "",
             "| kind | injected | suspects | above threshold | precision | recall | precision top-K | recall top-K |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r.kind} | {r.injected} | {r.suspects} | {r.above} | {r.precision_above:.2f} | {r.recall_above:.2f} "
              f"| {r.precision_top:.2f} | {r.recall_top:.2f} |" for r in table.itertuples()]
    lines += ["", f"K = the number injected of that kind. Injection, out-of-fold probabilities and audit: "
              f"{audit_minutes:.1f} minutes. Suspects that were not injected: {len(not_injected)} "
              f"({', '.join(f'{k} {v}' for k, v in not_injected['kind'].value_counts().items())}); contact sheets "
              f"(UTKFace faces, kept out of the project): {work / 'audit' / 'audit.png'}, "
              f"{work / 'audit' / 'not_injected.png'}."]
    if not args.skip_retrain:
        evals = {name: train_and_score(name, folder, recipe, work, log, relabel) for name, folder, relabel in (
            ("clean", UTKMASK / "train", None), ("noisy", work / "noisy", None),
            ("noisy_relabelled", work / "noisy", work / "audit" / "relabel_draft.csv"))}
        cost = evals["clean"]["f1"] - evals["noisy"]["f1"]
        recovered = (evals["noisy_relabelled"]["f1"] - evals["noisy"]["f1"]) / cost if cost > 0 else float("nan")
        lines += ["", f"Trained on the whole folder ({args.size}x{args.size}, {args.epochs} epochs, 20% of the people "
                  "held out for the best epoch), scored on utkmask eval:", "",
                  "| train folder | eval macro F1 | mask acc | gender acc | age acc |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {name} | {s['f1']:.4f} | {s['mask_acc']:.4f} | {s['gender_acc']:.4f} | {s['age_acc']:.4f} |"
                  for name, s in evals.items()]
        lines += ["", f"The noise cost {cost:+.4f} macro F1; the relabel draft recovered {recovered:.0%} of it."]
    report(lines, args.out)


def not_injected_sheet(inputs, data_dir, not_injected, out):
    """The contact sheet of the top suspects that were not injected (UTKFace's own label errors?)."""
    from audit import audit_table, contact_sheet, join, out_of_fold, probability_files
    from dataset import decode_multi_class
    files, _ = probability_files(inputs)
    data = join(audit_table(data_dir), out_of_fold(files))
    data["mask"], data["gender_label"], data["age_label"] = decode_multi_class(data["ans"].to_numpy())
    contact_sheet(out, not_injected.fillna(""), data, top=16)


if __name__ == "__main__":
    main()
