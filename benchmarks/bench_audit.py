"""How well audit.py finds label errors: inject known errors into a copy of utkmask's train folder
(gender flips, moves to a neighbouring age group, incorrect_mask <-> normal swaps), train k-fold with a
cheap recipe, audit, and report precision / recall per kind; then train the same recipe on the clean,
the noisy and the noisy-plus-relabel-draft folders and score each on utkmask eval.

    python benchmarks/bench_audit.py                      # needs ../shared/data/utkmask and the lite0 weights
"""
import argparse
import hashlib
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
from dataset import PERSON_FOLDER  # noqa: E402
from labels import AgeLabels

SHARED = ROOT.parent / "shared"
UTKMASK = SHARED / "data" / "utkmask"
WEIGHTS = SHARED / "weights" / "efficientnet_lite0.safetensors"
AGE_RANGES = ((18, 29), (30, 59), (60, 80))


def injection_plan(people, seed, gender=0.03, age=0.03, swap=0.02) -> pd.DataFrame:
    """The errors to inject into disjoint random people of `people` (folder names): kind, id, the
    person's clean and noisy folder names. The same seed gives the same plan."""
    rng = np.random.default_rng(seed)
    people = sorted(people)
    counts = [round(len(people) * share) for share in (gender, age, swap)]
    chosen = rng.permutation(people)
    rows = []
    for kind, names in zip(("gender", "age", "mask swap"), np.split(chosen[: sum(counts)], np.cumsum(counts)[:2]),
                           strict=True):
        for name in map(str, names):
            person_id, sex, race, years = PERSON_FOLDER.match(name).groups()
            new_name = name
            if kind == "gender":
                new_name = f"{person_id}_{'female' if sex == 'male' else 'male'}_{race}_{years}"
            elif kind == "age":
                group = int(AgeLabels.from_number(int(years)))
                target = 1 if group != 1 else int(rng.choice([0, 2]))
                low, high = AGE_RANGES[target]
                new_age = int(rng.integers(low, low + 5)) if target > group else int(rng.integers(high - 4, high + 1))
                new_name = f"{person_id}_{sex}_{race}_{new_age}"
            rows.append(dict(kind=kind, id=person_id, clean=name, noisy=new_name))
    return pd.DataFrame(rows)


def inject(clean, noisy, seed, gender=0.03, age=0.03, swap=0.02) -> pd.DataFrame:
    """Copy `clean` to `noisy` with the errors of `injection_plan` applied; returns the plan."""
    shutil.copytree(clean, noisy)
    plan = injection_plan([p.name for p in (noisy / "images").iterdir() if p.is_dir()], seed, gender, age, swap)
    for row in plan.itertuples():
        folder = noisy / "images" / row.clean
        if row.kind == "mask swap":
            files = {p.stem.lower(): p for p in folder.iterdir()}
            incorrect, normal = files["incorrect_mask"], files["normal"]
            tmp = folder / f"swap{incorrect.suffix}"
            incorrect.rename(tmp)
            normal.rename(folder / f"incorrect_mask{normal.suffix}")
            tmp.rename(folder / f"normal{incorrect.suffix}")
        folder.rename(folder.with_name(row.noisy))
    return plan


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
    """Train `recipe` on `data_dir` and score the best checkpoint on utkmask eval. A run scored before in
    this work folder (`--reuse`) with the same command, draft and code (the project's top-level .py files) is
    read back; any other is trained anew."""
    run_dir, out = work / "retrain" / name, work / "eval" / name
    extra = ["--relabel", relabel] if relabel else []
    command = [ROOT / "train.py", "--data_dir", data_dir, "--model_dir", run_dir.parent, "--name", name, *recipe,
               *extra]
    key = hashlib.sha1(json.dumps(list(map(str, command))).encode()
                       + (Path(relabel).read_bytes() if relabel else b"")
                       + b"".join(path.read_bytes() for path in sorted(ROOT.glob("*.py")))).hexdigest()
    if (out / "submission_scores.json").is_file() and (out / "key.txt").is_file() \
            and (out / "key.txt").read_text() == key:
        return json.loads((out / "submission_scores.json").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    run(command, log)
    run([ROOT / "inference.py", "--model_dir", run_dir, "--data_dir", UTKMASK / "eval", "--output_dir", out,
         "--labels", UTKMASK / "eval_labels.csv", "--num_workers", "0"], log)
    (out / "key.txt").write_text(key)
    return json.loads((out / "submission_scores.json").read_text())


def describe(cv_json) -> str:
    """A k-fold run's recipe in a few words, from its first fold's config."""
    config = json.loads((Path(json.loads(Path(cv_json).read_text())["folds"][0]) / "config.json").read_text())
    return (f"{config['n_folds']}-fold {config['model']}, {config['resize'][0]}x{config['resize'][1]}, "
            f"{config['epochs']} epochs, --freeze {config.get('freeze')}, --layer_decay {config.get('layer_decay')}, "
            f"--age_soft {config['age_soft']}, --seed {config['seed']}, --amp {config.get('amp_resolved')}")


def retrain_table(arms, seeds, recipe, work, log, size, epochs, injection_seed) -> list:
    """Train the recipe on each arm's folder once per seed, score on utkmask eval; markdown lines (the injection
    seed a column, so that the tables of several injections stack into one)."""
    evals = {arm: [train_and_score(f"{arm}_s{seed}", folder, recipe(seed), work, log, relabel) for seed in seeds]
             for arm, (folder, relabel) in arms.items()}
    f1 = {arm: np.array([s["f1"] for s in runs]) for arm, runs in evals.items()}
    lines = ["", f"Trained on the whole folder ({size}x{size}, {epochs} epochs, 20% of the people held out for the "
             f"best epoch), seeds {' '.join(map(str, seeds))}, scored on utkmask eval:", "",
             "| injection seed | train folder | eval macro F1 (mean +- sd) | per seed | mask acc | gender acc "
             "| age acc |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for arm, runs in evals.items():
        mean = {k: np.mean([s[k] for s in runs]) for k in ("mask_acc", "gender_acc", "age_acc")}
        spread = f1[arm].std(ddof=1) if len(seeds) > 1 else 0
        lines.append(f"| {injection_seed} | {arm} | {f1[arm].mean():.4f} +- {spread:.4f} | "
                     f"{' '.join(f'{v:.4f}' for v in f1[arm])} | {mean['mask_acc']:.4f} | {mean['gender_acc']:.4f} "
                     f"| {mean['age_acc']:.4f} |")
    cost = f1["clean"] - f1["noisy"]
    lines += ["", f"The noise cost {cost.mean():+.4f} macro F1 (per seed {' '.join(f'{c:+.4f}' for c in cost)})."]
    for arm in list(arms)[2:]:
        gain = f1[arm] - f1["noisy"]
        recovered = gain.mean() / cost.mean() if cost.mean() > 0 else float("nan")
        lines.append(f"`{arm}` recovered {recovered:.0%} of it (gain over noisy per seed "
                     f"{' '.join(f'{g:+.4f}' for g in gain)}).")
    if len(seeds) > 1:
        voted = {arm: voted_scores([work / "eval" / f"{arm}_s{seed}" for seed in seeds]) for arm in arms}
        lines += ["", "The seeds of each arm voted (their eval probabilities averaged), which takes out most of one "
                  "model's run-to-run spread:", "",
                  "| injection seed | train folder | eval macro F1 | gender acc | age F1 |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {injection_seed} | {arm} | {v['f1']:.4f} | {v['gender_acc']:.4f} | {v['age_f1']:.4f} |"
                  for arm, v in voted.items()]
        cost = voted["clean"]["f1"] - voted["noisy"]["f1"]
        lines += [""] + [f"Voted: the noise cost {cost:+.4f}; `{arm}` recovered "
                         f"{(voted[arm]['f1'] - voted['noisy']['f1']) / cost if cost > 0 else float('nan'):.0%}."
                         for arm in list(arms)[2:]]
    return lines


def voted_scores(eval_dirs) -> dict:
    """Scores of the mean of several runs' eval probabilities (inference.py's submission_probs.csv)."""
    from inference import read_labels
    from metrics import score
    from runs import PROB_COLUMNS
    probs = [pd.read_csv(Path(d) / "submission_probs.csv").set_index("ImageID") for d in eval_dirs]
    mean = sum(p[PROB_COLUMNS] for p in probs) / len(probs)
    return score(read_labels(UTKMASK / "eval_labels.csv", mean.index), mean.to_numpy())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "masktrain_audit"))
    parser.add_argument("--reuse", action="store_true", help="keep --work_dir from an earlier run with the same "
                        "--seed: its noisy folder, its k-fold runs (every runs/*_cv.json, averaged) and any scored "
                        "retrain runs; only the audit and what is missing run again")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--min_score", nargs="+", default=audit.build_parser().get_default("min_score"),
                        help="audit.py's --min_score: the draft's and the table's thresholds")
    parser.add_argument("--drop_drafts", nargs="*", default=["--min_score 0.9 swap=0.5 gender=0.7 --drop gender"],
                        metavar="AUDIT_FLAGS", help="audit.py flags of more drafts that leave unsure suspects out, "
                        "each retrained beside the relabel draft (noisy_dropped, noisy_dropped2, ...; none: no drafts)")
    parser.add_argument("--train_flags", default="", help="more train.py flags for the k-fold and retrain runs, "
                        "e.g. '--age_soft 3 --age_years 0.5'")
    parser.add_argument("--oof", metavar="CV_JSON", help="audit this k-fold run of the clean train folder, its "
                        "out-of-fold probabilities moved onto the noisy folder, instead of training on the noisy one")
    parser.add_argument("--skip_retrain", action="store_true", help="only the audit (no eval F1 of the drafts)")
    parser.add_argument("--retrain_seeds", nargs="+", type=int, help="seeds of the retrain runs (default: --seed)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_audit.md"))
    args = parser.parse_args(argv)
    if not (UTKMASK / "train").is_dir() or not WEIGHTS.is_file():
        raise SystemExit(f"error: needs {UTKMASK} and {WEIGHTS}")
    if args.oof and not Path(args.oof).is_file():
        raise SystemExit(f"error: --oof: {args.oof} not found")
    work = Path(args.work_dir)
    reused = sorted((work / "runs").glob("*_cv.json")) if args.reuse else []
    if args.reuse and not ((work / "noisy").is_dir() and (args.oof or reused)):
        raise SystemExit(f"error: --reuse: {work} holds no noisy folder and k-fold runs (runs/*_cv.json)")
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    log = work / "log.txt"
    started = time.time()
    if args.reuse:
        injected = injection_plan([p.name for p in (UTKMASK / "train" / "images").iterdir() if p.is_dir()], args.seed)
        if not all((work / "noisy" / "images" / name).is_dir() for name in injected["noisy"]):
            raise SystemExit(f"error: --reuse: {work / 'noisy'} was not injected with --seed {args.seed}")
    else:
        injected = inject(UTKMASK / "train", work / "noisy", args.seed)

    def recipe(seed):
        return ["--model", "efficientnet_lite0", "--pretrained", WEIGHTS, "--resize", args.size, args.size,
                "--crop", "1", "1", "--epochs", args.epochs, "--batch_size", "64", "--lr", "1e-3", "--cache",
                "--cache_dir", work / "cache", "--num_workers", "0", "--seed", seed, *args.train_flags.split()]
    if args.oof:
        inputs = labels_only_oof(args.oof, work / "noisy", injected, work / "oof")
        source = (f"the out-of-fold probabilities of {args.oof} (trained on the clean folder: {describe(args.oof)}) "
                  "moved onto the noisy folder; the models never saw the injected labels, so this is the best such "
                  "a recipe can find")
    elif reused:
        inputs = reused
        source = (f"the k-fold runs already in {work / 'runs'} ({'; '.join(describe(cv) for cv in reused)}), each "
                  "image's out-of-fold probabilities averaged, trained on the noisy folder")
    else:
        run([ROOT / "train.py", "--data_dir", work / "noisy", "--model_dir", work / "runs", "--name", "kfold",
             "--n_folds", args.n_folds, *recipe(args.seed)], log)
        inputs = [work / "runs" / "kfold_cv.json"]
        flags = args.train_flags.split()
        model = flags[flags.index("--model") + 1] if "--model" in flags else "efficientnet_lite0 (shared weights)"
        source = (f"{args.n_folds}-fold {model}, {args.size}x{args.size}, --crop 1 1, "
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
             "| injection seed | kind | injected | suspects | above threshold | precision | recall | precision top-K "
             "| recall top-K |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {args.seed} | {r.kind} | {r.injected} | {r.suspects} | {r.above} | {r.precision_above:.2f} "
              f"| {r.recall_above:.2f} "
              f"| {r.precision_top:.2f} | {r.recall_top:.2f} |" for r in table.itertuples()]
    minutes = f"{audit_minutes:.1f} minutes{' (the k-fold runs reused, not trained)' if reused else ''}"
    lines += ["", f"K = the number injected of that kind. Injection, out-of-fold probabilities and audit: "
              f"{minutes}. Suspects that were not injected: {len(not_injected)} "
              f"({', '.join(f'{k} {v}' for k, v in not_injected['kind'].value_counts().items())}); contact sheets "
              f"(UTKFace faces, kept out of the project): {work / 'audit' / 'audit.png'}, "
              f"{work / 'audit' / 'not_injected.png'}."]
    if not args.skip_retrain:
        arms = {"clean": (UTKMASK / "train", None), "noisy": (work / "noisy", None),
                "noisy_relabelled": (work / "noisy", work / "audit" / "relabel_draft.csv")}
        for k, flags in enumerate(args.drop_drafts, 1):
            name, out = ("noisy_dropped", "audit_drop") if k == 1 else (f"noisy_dropped{k}", f"audit_drop{k}")
            run([ROOT / "audit.py", *inputs, "--data_dir", work / "noisy", "--output_dir", work / out,
                 *flags.split()], log)
            lines += ["", f"`{name}`: the draft of `audit.py {flags}`."]
            arms[name] = (work / "noisy", work / out / "relabel_draft.csv")
        lines += retrain_table(arms, args.retrain_seeds or [args.seed], recipe, work, log, args.size, args.epochs,
                               args.seed)
    report(lines, args.out)


def not_injected_sheet(inputs, data_dir, not_injected, out):
    """The contact sheet of the top suspects that were not injected (UTKFace's own label errors?)."""
    from audit import audit_table, contact_sheet, join, out_of_fold, probability_files
    from labels import decode_multi_class
    files, _ = probability_files(inputs)
    data = join(audit_table(data_dir), out_of_fold(files))
    data["mask"], data["gender_label"], data["age_label"] = decode_multi_class(data["ans"].to_numpy())
    contact_sheet(out, not_injected.astype({"other": object}).fillna(""), data, top=16)


if __name__ == "__main__":
    main()
