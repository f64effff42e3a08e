"""audit.py on tiny generated data: out-of-fold probabilities that see the true labels find an
injected gender flip and a mask swap, the draft reads back through train.py --relabel and changes
exactly those labels, and files that do not match the train folder are one-line errors."""
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT

import audit
import train
from dataset import scan_people
from labels import combine_heads
from runs import probability_frame
from sample import make_sample


def head_probs_of(labels, n, rng, confidence=0.95):
    """Confident probabilities on `labels` with a little noise."""
    probs = np.full((len(labels), n), (1 - confidence) / (n - 1))
    probs[np.arange(len(labels)), labels] = confidence
    probs += rng.uniform(0, 0.02, probs.shape)
    return probs / probs.sum(1, keepdims=True)


def run_config(data_dir) -> dict:
    """A run's config.json (a real one, kept as a fixture) that trained on `data_dir`."""
    config = json.loads((Path(__file__).parent / "fixtures" / "run_9eee33f" / "config.json").read_text())
    return dict(config, data_dir=str(data_dir), age_bins=[30, 60], relabel=None)


def write_fake_folds(given, labels, run_root, data_dir, seed=0) -> list:
    """Three fake k-fold run folders over `given`'s people: val_probs.csv confident on `labels`
    (mask, gender, age columns) with `given`'s class as ans, and a config.json; returns the folders."""
    rng = np.random.default_rng(seed)
    probs = combine_heads(*(head_probs_of(labels[c].to_numpy(), n, rng) for c, n in zip(labels, (3, 2, 3),
                                                                                        strict=True)))
    folds = []
    for k, members in enumerate(np.array_split(np.array(sorted(given["person"].unique())), 3)):
        run_dir = Path(run_root) / f"cv_fold{k}"
        run_dir.mkdir(parents=True)
        rows = given["person"].isin(members).to_numpy()
        frame = probability_frame(given.index[rows], probs[rows])
        frame.insert(1, "ans", given["class"].to_numpy()[rows])
        frame.to_csv(run_dir / "val_probs.csv", index=False)
        (run_dir / "config.json").write_text(json.dumps(run_config(data_dir)))
        folds.append(str(run_dir))
    (Path(run_root) / "cv_cv.json").write_text(json.dumps(dict(folds=folds)))
    return folds


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """A 12-person sample with person 3's gender flipped and person 7's incorrect_mask / normal swapped,
    and three fake k-fold runs whose probabilities follow the true (clean) labels."""
    root = tmp_path_factory.mktemp("audit")
    clean = make_sample(root / "clean", n_people=12, n_eval_people=0, size=(48, 36), seed=2) / "train"
    shutil.copytree(clean, root / "noisy")
    images = root / "noisy" / "images"
    people = sorted(p.name for p in images.iterdir())
    sexes = ("_male_", "_female_") if "_male_" in people[3] else ("_female_", "_male_")
    flipped = people[3].replace(*sexes)
    (images / people[3]).rename(images / flipped)
    swapped = images / people[7]
    (swapped / "normal.jpg").rename(swapped / "tmp.jpg")
    (swapped / "incorrect_mask.jpg").rename(swapped / "normal.jpg")
    (swapped / "tmp.jpg").rename(swapped / "incorrect_mask.jpg")
    truth = scan_people(clean).assign(ImageID=lambda t: t["path"].map(lambda p: "/".join(p.split("/")[-2:])))
    truth["ImageID"] = truth["ImageID"].str.replace(people[3], flipped)
    swapped_rows = truth["person"] == people[7]
    truth.loc[swapped_rows, "mask"] = truth.loc[swapped_rows, "mask"].map({1: 2, 2: 1, 0: 0})
    seen = truth.set_index("ImageID")[["mask", "gender_label", "age_label"]].add_suffix("_seen")
    given = audit.audit_table(root / "noisy").join(seen)
    folds = write_fake_folds(given, given[["mask_seen", "gender_label_seen", "age_label_seen"]], root / "runs",
                             root / "noisy")
    return dict(root=root, clean=clean, flipped=flipped, swapped=people[7], folds=folds)


def test_finds_the_gender_flip_and_the_mask_swap(noisy, tmp_path):
    suspects = audit.main([str(noisy["root"] / "runs" / "cv_cv.json"), "--output_dir", str(tmp_path)])
    found = pd.read_csv(tmp_path / "audit.csv", dtype={"id": str})
    assert list(found["kind"][:2].sort_values()) == ["gender", "mask swap"] and len(found) == len(suspects)
    gender = found[found["kind"] == "gender"].iloc[0]
    assert gender["person"] == noisy["flipped"] and gender["score"] > 0.9
    swap = found[found["kind"] == "mask swap"].iloc[0]
    assert swap["person"] == noisy["swapped"] and swap["score"] > 0.9
    assert found["score"].is_monotonic_decreasing
    draft = pd.read_csv(tmp_path / "relabel_draft.csv", dtype=str).fillna("")
    assert list(draft.columns) == ["id", "gender", "age", "path", "mask"] and len(draft) == 3
    with Image.open(tmp_path / "audit.png") as sheet:
        assert sheet.width > 7 * 72 and sheet.height >= 2 * 72


def test_the_draft_reads_back_through_train_relabel(noisy, tmp_path, capsys):
    audit.main([str(noisy["root"] / "runs" / "cv_cv.json"), "--output_dir", str(tmp_path)])
    draft = tmp_path / "relabel_draft.csv"
    train.main(["--data_dir", str(noisy["root"] / "noisy"), "--model_dir", str(tmp_path / "runs"), "--model",
                "test_resnet", "--pretrained", "none", "--resize", "32", "24", "--num_workers", "0", "--epochs",
                    "1", "--relabel", str(draft),
                "--cache_dir", str(tmp_path / "cache")])
    assert "changed gender of 1 people, age of 0 people, mask of 2 images" in capsys.readouterr().out
    fixed = scan_people(noisy["root"] / "noisy", relabel=draft).set_index("path")
    before = scan_people(noisy["root"] / "noisy").set_index("path")
    changed = (fixed[["gender_label", "mask"]] != before[["gender_label", "mask"]]).any(axis=1)
    assert set(fixed.index[changed].map(lambda p: p.split("/")[-2])) == {noisy["flipped"], noisy["swapped"]}
    assert changed.sum() == 7 + 2


def test_a_drop_draft_leaves_the_suspect_person_out(noisy, tmp_path):
    """--drop gender: the gender suspect becomes a `drop` row (the person left out of training), the swap
    is still relabelled."""
    audit.main([str(noisy["root"] / "runs" / "cv_cv.json"), "--output_dir", str(tmp_path), "--drop", "gender"])
    draft = pd.read_csv(tmp_path / "relabel_draft.csv", dtype=str).fillna("")
    assert list(draft.columns) == [*audit.RELABEL_COLUMNS, "drop"]
    flipped_id = noisy["flipped"].split("_")[0]
    assert draft.loc[draft["drop"] == "yes", "id"].tolist() == [flipped_id]
    assert (draft.loc[draft["drop"] == "yes", "gender"] == "").all() and (draft["mask"] != "").sum() == 2
    before = scan_people(noisy["root"] / "noisy")
    after = scan_people(noisy["root"] / "noisy", relabel=tmp_path / "relabel_draft.csv")
    assert set(before["person"]) - set(after["person"]) == {noisy["flipped"]} and len(after) == len(before) - 7
    swapped = after[after["person"] == noisy["swapped"]].set_index("path")
    assert sorted(swapped["mask"]) == sorted(before[before["person"] == noisy["swapped"]]["mask"])
    assert (swapped["mask"] != before.set_index("path").loc[swapped.index, "mask"]).sum() == 2


def test_the_draft_holds_each_kind_above_its_threshold(noisy, tmp_path):
    """Defaults: gender and mask suspects at 0.9, mask swaps at 0.5, no age moves; KIND=SCORE sets one kind."""
    suspects = audit.main([str(noisy["root"] / "runs" / "cv_cv.json"), "--output_dir", str(tmp_path / "a")])
    swap_score = suspects.loc[suspects["kind"] == "mask swap", "score"].iloc[0]
    found = audit.main([str(noisy["root"] / "runs" / "cv_cv.json"), "--output_dir", str(tmp_path / "b"),
                        "--min_score", f"swap={swap_score + 0.01:.4f}", "0.5", "--draft_kinds", "gender", "mask swap",
                        "age"])
    draft = pd.read_csv(tmp_path / "b" / "relabel_draft.csv", dtype=str).fillna("")
    expected = (found["kind"].isin(["gender", "age"]) & (found["score"] >= 0.5)).sum()
    assert len(draft) == expected and (draft["mask"] == "").all()  # the swap is under its own threshold
    assert audit.min_scores(["swap=0.5", "0.7"]) == {"gender": 0.7, "age": 0.7, "mask": 0.7, "mask swap": 0.5}
    for flags, message in ((["--min_score", "eyes=0.5"], "unknown kind 'eyes'"),
                           (["--min_score", "1.5"], r"must be in \[0, 1\]"),
                           (["--duplicate_min", "0"], r"--duplicate_min must be in \(0, 1\]")):
        with pytest.raises(SystemExit, match=message):
            audit.main([str(noisy["root"] / "runs" / "cv_cv.json"), "--output_dir", str(tmp_path / "c"), *flags])


def test_files_that_do_not_match_the_train_folder_are_errors(noisy, tmp_path):
    with pytest.raises(SystemExit, match=r"error: the probability files cover 56 of 84 images: 28 have no out-of"):
        audit.main(noisy["folds"][:2] + ["--output_dir", str(tmp_path)])
    stray = tmp_path / "stray.csv"
    frame = pd.read_csv(f"{noisy['folds'][0]}/val_probs.csv")
    frame.loc[0, "ImageID"] = "999999_male_Asian_30/normal.jpg"
    frame.to_csv(stray, index=False)
    with pytest.raises(SystemExit, match="1 images of the probability files are not in the train folder"):
        audit.main([str(stray), *noisy["folds"][1:], "--data_dir", str(noisy["root"] / "noisy"), "--output_dir",
                    str(tmp_path)])
    other = tmp_path / "other_run"
    shutil.copytree(noisy["folds"][0], other)
    (other / "config.json").write_text(json.dumps(run_config(noisy["clean"])))
    with pytest.raises(SystemExit, match="different train folders"):
        audit.main([str(other), *noisy["folds"][1:], "--output_dir", str(tmp_path)])
    (tmp_path / "bad_cv.json").write_text("not json")
    with pytest.raises(SystemExit, match="bad_cv.json: not a train.py <name>_cv.json"):
        audit.main([str(tmp_path / "bad_cv.json"), "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="pass the train folder with --data_dir"):
        audit.main([f"{noisy['folds'][0]}/val_probs.csv", "--output_dir", str(tmp_path)])


def test_bench_audit_moves_clean_out_of_fold_probabilities_onto_the_noisy_folder(tmp_path, monkeypatch):
    """bench_audit --oof: each image keeps its prediction under its noisy name, `ans` is the noisy label,
    and the audit of the moved probabilities finds what was injected."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_audit
    clean = make_sample(tmp_path / "clean", n_people=24, n_eval_people=0, size=(48, 36), seed=4) / "train"
    table = audit.audit_table(clean)
    write_fake_folds(table, table[["mask", "gender_label", "age_label"]], tmp_path / "runs", clean, seed=1)
    injected = bench_audit.inject(clean, tmp_path / "noisy", seed=0, gender=0.1, age=0.1, swap=0.1)
    assert injected["kind"].value_counts().to_dict() == {"gender": 2, "age": 2, "mask swap": 2}
    plan = bench_audit.injection_plan([p.name for p in (clean / "images").iterdir()], 0, 0.1, 0.1, 0.1)
    assert plan.equals(injected)  # what --reuse relies on: the plan alone gives the injected folder's names
    files = bench_audit.labels_only_oof(tmp_path / "runs" / "cv_cv.json", tmp_path / "noisy", injected,
                                        tmp_path / "oof")
    moved = pd.concat(map(pd.read_csv, files)).set_index("ImageID")
    noisy = audit.audit_table(tmp_path / "noisy")
    assert sorted(moved.index) == sorted(noisy.index) and (moved["ans"] == noisy["class"].reindex(moved.index)).all()
    swapped = injected.loc[injected["kind"] == "mask swap", "noisy"].iloc[0]
    assert moved.loc[f"{swapped}/normal.jpg", ["mask_p0", "mask_p1", "mask_p2"]].to_numpy().argmax() == 1
    audit.main([*map(str, files), "--data_dir", str(tmp_path / "noisy"), "--output_dir", str(tmp_path / "audit")])
    found = pd.read_csv(tmp_path / "audit" / "audit.csv", dtype={"id": str})
    for kind in ("gender", "age", "mask swap"):
        truth = set(injected.loc[injected["kind"] == kind, "id"])
        assert bench_audit.scores(found, injected, kind, 0.5)["recall_top"] == 1.0, (kind, truth)


def test_an_age_suspect_is_suggested_at_the_years_heads_age(noisy, tmp_path):
    """With the years head's ages in the files, an age suspect's draft age is its predicted age, not
    the age of the suggested group nearest to the folder name's."""
    folds, ages_of_group = [], np.array([20.0, 45.0, 70.0])
    for k, fold in enumerate(noisy["folds"]):
        run_dir = tmp_path / f"cv_fold{k}"
        shutil.copytree(fold, run_dir)
        frame = pd.read_csv(run_dir / "val_probs.csv")
        age_columns = ["age_p0", "age_p1", "age_p2"]
        if k == 0:  # the first person looks clearly of another age group than their folder name says
            moved = frame["ImageID"][0].split("/")[0]
            other = 1 if frame.loc[0, age_columns].to_numpy().argmax() != 1 else 0
            looks = np.where(np.arange(3) == other, 0.96, 0.02)
            frame.loc[frame["ImageID"].str.startswith(moved + "/"), age_columns] = looks
        frame["age_years"] = ages_of_group[frame[age_columns].to_numpy().argmax(1)]
        frame.to_csv(run_dir / "val_probs.csv", index=False)
        folds.append(str(run_dir))
    found = audit.main([*folds, "--output_dir", str(tmp_path / "years"), "--draft_kinds", "age"])
    suspect = found[(found["kind"] == "age") & (found["person"] == moved)].iloc[0]
    assert suspect["relabel"]["age"] == int(ages_of_group[other])
    draft = pd.read_csv(tmp_path / "years" / "relabel_draft.csv", dtype=str).fillna("")
    assert draft.loc[draft["id"] == moved.split("_")[0], "age"].tolist() == [str(int(ages_of_group[other]))]


def test_an_age_suspect_is_scored_against_the_people_given_the_same_group():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    given = np.array([0.99, 0.98, 0.99, 0.6, 0.5, 0.45, 0.55, 0.5])  # 30-59 is less sure for everyone
    scores = audit.unusual_within_group(labels, given)
    assert scores.argmax() == 3 and (1 - given).argmax() == 5
    assert np.all((scores[:4].argsort() == (1 - given[:4]).argsort()))
    less_sure = 1 / (1 + np.exp(-(np.log(given[4:] / (1 - given[4:])) - 1)))  # the group's log-odds less 1
    assert np.allclose(audit.unusual_within_group(labels, np.r_[given[:4], less_sure]), scores, atol=1e-6)


def test_a_swap_is_judged_on_the_pair_not_on_cleanlabs_flags():
    """A swapped pair predicted at only 0.6 for the other label, among images predicted at 0.99, is
    below cleanlab's per-class thresholds (not flagged) and is still one mask swap."""
    rng = np.random.default_rng(0)
    stems = ["mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"]
    rows = []
    for person in range(20):
        for stem in stems:
            mask = {"incorrect_mask": 1, "normal": 2}.get(stem, 0)
            rows.append(dict(person=f"{person:06d}_male_Asian_30", id=f"{person:06d}", mask=mask,
                             path=f"{person:06d}_male_Asian_30/{stem}.jpg"))
    data = pd.DataFrame(rows).set_index("path", drop=False)
    probs = head_probs_of(data["mask"].to_numpy(), 3, rng, confidence=0.99)
    for stem, looks_like in (("incorrect_mask", 2), ("normal", 1)):
        probs[data.index.get_loc(f"000000_male_Asian_30/{stem}.jpg")] = np.roll([0.1, 0.3, 0.6], looks_like - 2)
    data[[f"mask_p{i}" for i in range(3)]] = probs
    assert len(audit.ranked_issues(data["mask"].to_numpy(), probs)[0]) == 0
    suspects = audit.mask_suspects(data)
    assert [(row["kind"], row["id"]) for row in suspects] == [("mask swap", "000000")]
    assert suspects[0]["score"] == pytest.approx((0.7 + 0.9) / 2)  # 1 - p(given): 0.3 and 0.1


def test_one_photo_under_two_ids_is_a_duplicate(tmp_path):
    """A person's folder copied under another id with another label, its `normal` photo re-saved darker,
    is the one pair found (generated people each have a look of their own, so none of them match: on real
    faces copies score 0.86-0.99 and other people at most 0.79)."""
    train_dir = make_sample(tmp_path, n_people=12, n_eval_people=0, size=(48, 36), seed=3) / "train"
    images = train_dir / "images"
    source = sorted(images.iterdir())[4]
    copy = images / "000777_female_Asian_61"
    shutil.copytree(source, copy)
    with Image.open(copy / "normal.jpg") as photo:
        photo.point(lambda v: int(v * 0.8)).save(copy / "normal.jpg", quality=70)
    table = audit.audit_table(train_dir)
    found = audit.duplicate_suspects(table)
    assert len(found) == 1 and {found[0]["person"], found[0]["other"]} == {source.name, copy.name}
    assert found[0]["score"] > 0.95 and found[0]["relabel"] == {"id": found[0]["id"]}
    assert found[0]["suggested"].startswith("same photo as ")
    assert audit.duplicate_suspects(table, min_similarity=0.999) == []
    pair = pd.DataFrame(found)
    draft = audit.relabel_draft(pair, audit.min_scores([]), kinds=(), drop=("duplicate",))
    draft.to_csv(tmp_path / "draft.csv", index=False)
    kept = set(scan_people(train_dir, relabel=tmp_path / "draft.csv")["person"])
    assert len(pair) == 1 and draft["drop"].tolist() == ["yes"]
    assert {source.name, copy.name} - kept == {pair["person"][0]} and pair["other"][0] in kept


def test_a_folder_without_repeated_photos_audits_without_pandas_deprecations(noisy, tmp_path):
    """No duplicate pair leaves the `other` column all missing: filling it must not rely on a cast pandas
    deprecates (pandas 3 warns, pandas 4 raises)."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("error", category=category, module="audit")
        suspects = audit.main([str(noisy["root"] / "runs" / "cv_cv.json"), "--output_dir", str(tmp_path),
                               "--duplicate_min", "1"])
    assert "duplicate" not in set(suspects["kind"]) and set(suspects["other"]) == {""}


def test_the_contact_sheet_shows_the_top_of_each_kind():
    """Thirty confident age suspects do not push a weaker gender suspect or a duplicate off the sheet."""
    rows = [dict(kind="age", score=0.99 - i / 1000) for i in range(30)]
    rows += [dict(kind="gender", score=0.7), dict(kind="duplicate", score=0.9), dict(kind="gender", score=0.6)]
    suspects = pd.DataFrame(rows).sort_values("score", ascending=False, kind="stable")
    shown = audit.sheet_rows(suspects, top=5)
    assert list(shown["kind"]) == ["gender", "gender", "duplicate"] + ["age"] * 5
    assert list(shown["rank"]) == [1, 2, 1, 1, 2, 3, 4, 5]
    assert shown["score"].iloc[3:].tolist() == sorted(shown["score"].iloc[3:], reverse=True)
    with pytest.raises(SystemExit, match="--top must be at least 1, got 0"):
        audit.main(["x_cv.json", "--top", "0"])


def test_bench_audit_reuse_reads_a_retrain_back_only_while_command_draft_and_code_are_unchanged(tmp_path, monkeypatch):
    """bench_audit --reuse: a scored retrain is read back for the same command, draft and code, and trained
    anew when the draft or any of the project's .py files changes."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_audit
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("# v1\n")
    monkeypatch.setattr(bench_audit, "ROOT", project)
    trained = []

    def fake_run(command, log):
        trained.append(Path(command[0]).name)
        if Path(command[0]).name == "inference.py":
            out = Path(command[command.index("--output_dir") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "submission_scores.json").write_text(json.dumps({"f1": 0.5}))

    monkeypatch.setattr(bench_audit, "run", fake_run)
    draft = tmp_path / "draft.csv"
    draft.write_text("id,gender\n1,male\n")

    def score_again():
        trained.clear()
        result = bench_audit.train_and_score("arm_s0", tmp_path / "noisy", ["--seed", "0"], tmp_path / "work",
                                             tmp_path / "log.txt", relabel=draft)
        assert result == {"f1": 0.5}
        return bool(trained)

    assert score_again()
    assert not score_again()
    draft.write_text("id,gender\n2,male\n")
    assert score_again()
    assert not score_again()
    (project / "dataset.py").write_text("# new code\n")
    assert score_again()
