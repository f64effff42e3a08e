import json
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

import ensemble
import inference
import train
from runs import PROB_COLUMNS, probability_frame


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("runs")
    train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(model_dir), "--model", "test_resnet",
                "--pretrained", "none",
                "--resize", "64", "48", "--num_workers", "0", "--epochs", "2", "--batch_size", "32", "--lr", "3e-3",
                "--report", "off"])
    return model_dir / "exp"


def predict(trained, tiny_data, out, *flags):
    return inference.main(["--model_dir", str(trained), "--data_dir", str(tiny_data / "eval"), "--output_dir", str(out),
                           "--num_workers", "0", *flags])


def test_submission_matches_info(trained, tiny_data, tmp_path):
    predict(trained, tiny_data, tmp_path)
    info = pd.read_csv(tiny_data / "eval" / "info.csv")
    submission = pd.read_csv(tmp_path / "submission.csv")
    assert list(submission.columns) == list(info.columns)
    assert submission["ImageID"].tolist() == info["ImageID"].tolist()
    assert submission["ans"].dtype.kind == "i" and submission["ans"].between(0, 17).all()
    probs = pd.read_csv(tmp_path / "submission_probs.csv")
    assert probs["ImageID"].tolist() == info["ImageID"].tolist()
    assert (probs[PROB_COLUMNS].to_numpy().argmax(1) == submission["ans"]).all()
    assert {"mask_p2", "gender_p1", "age_p2"} <= set(probs.columns)
    with pytest.raises(SystemExit, match="exists: pass --overwrite"):
        predict(trained, tiny_data, tmp_path)
    predict(trained, tiny_data, tmp_path, "--overwrite")


def test_newest_run_is_the_default(trained, tiny_data, tmp_path):
    assert inference.newest_run(trained.parent) == trained
    with pytest.raises(FileNotFoundError, match="no finished run folder"):
        inference.newest_run(tmp_path)


def test_tta_is_the_mean_of_plain_and_flipped(trained, tiny_data, tmp_path):
    exact = ["--amp", "off", "--channels_last", "off"]  # compared with a plain fp32 forward below
    plain = predict(trained, tiny_data, tmp_path, "--name", "plain.csv", "--tta", "none", *exact)
    both = predict(trained, tiny_data, tmp_path, "--name", "tta.csv", "--tta", "hflip", *exact)
    import torch

    from augment import create_transforms
    from dataset import ImageFiles, PrefetchLoader, fast_collate
    from model import build_model, probs18
    from runs import read_run
    from spec import RunSpec
    config, state = read_run(trained)
    model = build_model(**RunSpec.of(config).model_args)
    model.load_state_dict(state["model"])
    model.eval()
    paths = inference.eval_images(tiny_data / "eval")[1]
    transform = create_transforms(config["augmentation"], config["resize"])[1]
    loader = torch.utils.data.DataLoader(ImageFiles(paths, transform), 64, collate_fn=fast_collate)
    prep = config["preprocessing"]
    with torch.no_grad():
        batches = PrefetchLoader(loader, prep["mean"], prep["std"], "cpu")
        flipped = torch.cat([probs18(model(x.flip(3))) for x, _ in batches])
    flipped = flipped.numpy()
    assert np.allclose(both, (plain + flipped) / 2, atol=1e-6)
    assert not np.allclose(plain, flipped, atol=1e-4)


def test_missing_image_fails_before_work(trained, tiny_data, tmp_path):
    shutil.copytree(tiny_data / "eval", tmp_path / "eval")
    first = pd.read_csv(tiny_data / "eval" / "info.csv")["ImageID"][0]
    (tmp_path / "eval" / "images" / first).unlink()
    with pytest.raises(SystemExit, match=f"1 images listed in .*missing, e.g. .*{first}"):
        inference.main(["--model_dir", str(trained), "--data_dir", str(tmp_path / "eval"),
                        "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,message", [(["--batch_size", "0"], "--batch_size must be positive, got 0"),
                                           (["--num_workers", "-1"], "--num_workers must be >= 0, got -1")])
def test_bad_loader_flags_are_one_line_errors(trained, tiny_data, tmp_path, flags, message):
    common = ["--data_dir", str(tiny_data / "eval"), "--output_dir", str(tmp_path / "out"), *flags]
    for main, run_args in ((inference.main, ["--model_dir", str(trained)]), (ensemble.main, [str(trained)])):
        with pytest.raises(SystemExit, match=message):
            main(run_args + common)
    assert not (tmp_path / "out").exists()


def test_run_folder_without_checkpoint_is_clear(trained, tiny_data, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(trained / "config.json", broken)
    with pytest.raises(SystemExit, match="has no best.pth"):
        predict(broken, tiny_data, tmp_path)


def test_local_scoring_equals_sklearn(trained, tiny_data, tmp_path, capsys):
    predict(trained, tiny_data, tmp_path, "--labels", str(tiny_data / "eval_labels.csv"))
    truth = pd.read_csv(tiny_data / "eval_labels.csv").set_index("ImageID")["ans"]
    submission = pd.read_csv(tmp_path / "submission.csv")
    expected = f1_score(truth[submission["ImageID"]].to_numpy(), submission["ans"], average="macro")
    scores = pd.read_json(tmp_path / "submission_scores.json", typ="series")
    assert scores["f1"] == pytest.approx(expected)
    assert f"macro F1 {expected:.4f}" in capsys.readouterr().out


def test_train_layout_holdout_is_scored(trained, tiny_data, tmp_path, capsys):
    inference.main(["--model_dir", str(trained), "--data_dir", str(tiny_data / "train"), "--output_dir", str(tmp_path),
                    "--num_workers", "0"])
    assert len(pd.read_csv(tmp_path / "submission.csv")) == 24 * 7
    assert "macro F1" in capsys.readouterr().out


def probs_file(path, ids, probs):
    probability_frame(ids, np.asarray(probs, dtype=float)).to_csv(path, index=False)
    return str(path)


def eye(classes):
    return np.eye(18)[classes] * 0.9 + 0.1 / 18


def test_soft_voting_of_identical_inputs_returns_the_input():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(18), size=10)
    classes, mean = ensemble.ensemble(np.stack([probs, probs, probs]), [1, 2, 3], "soft")
    assert np.allclose(mean, probs) and (classes == probs.argmax(1)).all()


def test_hard_voting_follows_the_majority_and_breaks_ties_by_probability():
    a, b, c = eye([0, 5]), eye([0, 7]), eye([3, 7])
    classes, _ = ensemble.vote(np.stack([a, b, c]), [1, 1, 1], "hard")
    assert classes.tolist() == [0, 7]
    strong = np.eye(18)[[4]] * 0.95
    weak = np.eye(18)[[9]] * 0.5 + np.eye(18)[[4]] * 0.4
    classes, _ = ensemble.vote(np.stack([strong, weak]), [1, 1], "hard")
    assert classes.tolist() == [4]
    classes, _ = ensemble.vote(np.stack([strong, weak]), [1, 2], "hard")
    assert classes.tolist() == [9]


def test_per_head_voting():
    # three inputs agree on mask 2 / gender 1 by majority but each predicts a different 18-class id
    a, b, c = eye([2 * 6 + 1 * 3 + 0]), eye([2 * 6 + 0 * 3 + 1]), eye([0 * 6 + 1 * 3 + 1])
    assert ensemble.vote(np.stack([a, b, c]), [1, 1, 1], "hard")[0].tolist() != [2 * 6 + 1 * 3 + 1]
    classes, probs = ensemble.ensemble(np.stack([a, b, c]), [1, 1, 1], "hard", per_head=True)
    assert classes.tolist() == [2 * 6 + 1 * 3 + 1]
    assert np.allclose(probs.sum(1), 1)


def test_ensemble_cli_with_runs_files_and_folds(trained, tiny_data, tmp_path):
    predict(trained, tiny_data, tmp_path, "--name", "one.csv")
    out = tmp_path / "ens"
    ensemble.main([str(trained), str(tmp_path / "one_probs.csv"), "--data_dir", str(tiny_data / "eval"),
                   "--output_dir", str(out), "--num_workers", "0", "--weights", "1", "2"])
    info = pd.read_csv(tiny_data / "eval" / "info.csv")
    submission = pd.read_csv(out / "ensemble.csv")
    assert submission["ImageID"].tolist() == info["ImageID"].tolist()
    single = pd.read_csv(tmp_path / "one.csv")
    assert (submission["ans"] == single["ans"]).all()
    assert (trained / "eval_probs.csv").is_file()


def test_mismatched_inputs_fail_clearly(tiny_data, tmp_path):
    ids = pd.read_csv(tiny_data / "eval" / "info.csv")["ImageID"].tolist()
    good = probs_file(tmp_path / "good.csv", ids, eye(np.zeros(len(ids), int)))
    short = probs_file(tmp_path / "short.csv", ids[:-1], eye(np.zeros(len(ids) - 1, int)))
    frame = pd.read_csv(good)
    frame.drop(columns=["p17"]).to_csv(tmp_path / "classes.csv", index=False)
    common = ["--data_dir", str(tiny_data / "eval"), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="short.csv: ImageIDs differ"):
        ensemble.main([good, short, *common])
    with pytest.raises(SystemExit, match="classes.csv: a probability file needs .*17 class columns"):
        ensemble.main([good, str(tmp_path / "classes.csv"), *common])
    with pytest.raises(SystemExit, match="--weights: 1 weights for 2 inputs"):
        ensemble.main([good, good, "--weights", "1", *common])
    broken = frame.copy()
    broken.loc[3, "p5"] = float("nan")
    broken.to_csv(tmp_path / "nan.csv", index=False)
    with pytest.raises(SystemExit, match=f"nan.csv: 1 rows of p0..p17 are not probabilities .* ImageID {ids[3]}"):
        ensemble.main([good, str(tmp_path / "nan.csv"), *common])
    frame.assign(p0=frame["p0"] + 1).to_csv(tmp_path / "logits.csv", index=False)
    with pytest.raises(SystemExit, match=f"logits.csv: {len(ids)} rows of p0..p17 are not probabilities"):
        ensemble.main([good, str(tmp_path / "logits.csv"), *common])
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "binary.csv").write_bytes(bytes(range(128, 256)))
    for name in ("empty.csv", "binary.csv"):
        with pytest.raises(SystemExit, match=f"{name}: not a probability CSV"):
            ensemble.main([good, str(tmp_path / name), *common])
    shuffled = frame.sample(frac=1, random_state=0)
    shuffled.to_csv(tmp_path / "shuffled.csv", index=False)
    ensemble.main([good, str(tmp_path / "shuffled.csv"), *common])
    assert pd.read_csv(tmp_path / "out" / "ensemble.csv")["ImageID"].tolist() == ids


def test_image_ids_that_look_like_numbers_stay_text(trained, tiny_data, tmp_path):
    shutil.copytree(tiny_data / "eval", tmp_path / "eval")
    info = pd.read_csv(tmp_path / "eval" / "info.csv")
    numbers = [f"{i:06d}" for i in range(len(info))]  # 000000 ... without an extension
    for old, new in zip(info["ImageID"], numbers, strict=True):
        (tmp_path / "eval" / "images" / old).rename(tmp_path / "eval" / "images" / new)
    info["ImageID"] = numbers
    info.to_csv(tmp_path / "eval" / "info.csv", index=False)
    inference.main(["--model_dir", str(trained), "--data_dir", str(tmp_path / "eval"), "--output_dir",
                    str(tmp_path / "out"), "--num_workers", "0"])
    ensemble.main([str(tmp_path / "out" / "submission_probs.csv"), "--data_dir", str(tmp_path / "eval"),
                   "--output_dir", str(tmp_path / "ens")])
    for written in (tmp_path / "out" / "submission.csv", tmp_path / "ens" / "ensemble.csv"):
        assert written.read_text().splitlines()[1].startswith("000000,"), written


@pytest.mark.parametrize("text, message", [("", "info.csv is empty"), ("ImageID,ans\n", "info.csv lists no images"),
                                           ('ImageID,ans\n"a.jpg,0\n', "info.csv: not a CSV of ImageID,ans"),
                                           ("\x9e\xff\n", "info.csv: not a CSV of ImageID,ans")])
def test_an_info_csv_without_usable_rows_fails_clearly(trained, tiny_data, tmp_path, text, message):
    shutil.copytree(tiny_data / "eval", tmp_path / "eval")
    (tmp_path / "eval" / "info.csv").write_bytes(text.encode("latin-1"))
    with pytest.raises(SystemExit, match=message):
        inference.main(["--model_dir", str(trained), "--data_dir", str(tmp_path / "eval"), "--output_dir",
                        str(tmp_path / "out"), "--num_workers", "0"])
    (tmp_path / "eval" / "info.csv").unlink()
    with pytest.raises(SystemExit, match="has no info.csv .an eval folder. and no person folders"):
        inference.main(["--model_dir", str(trained), "--data_dir", str(tmp_path / "eval"), "--output_dir",
                        str(tmp_path / "out"), "--num_workers", "0"])


def test_inference_points_a_k_fold_run_to_ensemble(tiny_data, tmp_path, capsys):
    train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path), "--name", "cv", "--model",
                "test_resnet", "--pretrained", "none", "--resize", "32", "24", "--num_workers", "0", "--epochs", "1",
                "--n_folds", "2", "--report", "off"])
    summary = tmp_path / "cv_cv.json"
    assert (f"the folds are listed in {summary}; vote them with: python ensemble.py {summary} --data_dir EVAL_DIR"
            in capsys.readouterr().out.splitlines()[-1])
    with pytest.raises(SystemExit, match=f"cv_cv.json is a k-fold run's summary: vote its folds with python "
                                         f"ensemble.py {summary}"):
        predict(summary, tiny_data, tmp_path / "out")
    predict(tmp_path, tiny_data, tmp_path / "out")  # the newest run folder: the last fold
    assert f"this is fold 1 of 2: python ensemble.py {summary} votes them all" in capsys.readouterr().out


def test_ensemble_notes_runs_trained_with_different_age_bins(trained, tiny_data, tmp_path, capsys):
    other = tmp_path / "bins58"
    shutil.copytree(trained, other)
    config = json.loads((other / "config.json").read_text())
    spec = {**config["spec"], "age_bins": [30, 58]}  # the spec: what the tools read
    (other / "config.json").write_text(json.dumps({**config, "age_bins": [30, 58], "spec": spec}))
    flags = ["--data_dir", str(tiny_data / "eval"), "--num_workers", "0"]
    ensemble.main([str(trained), str(trained), *flags, "--output_dir", str(tmp_path / "same")])
    assert "age_bins" not in capsys.readouterr().out
    ensemble.main([str(trained), str(other), *flags, "--output_dir", str(tmp_path / "mixed")])
    out = capsys.readouterr().out
    assert "note: the runs were trained with different --age_bins (30 60: exp; 30 58: bins58)" in out


def test_head_weights_take_each_head_from_the_inputs_asked_for():
    """Input 0 is right on mask only, input 1 on gender and age only: per-head weights combine them."""
    truth = np.array([0 * 6 + 1 * 3 + 2, 2 * 6 + 0 * 3 + 1])  # (wear, female, 60+), (not wear, male, 30-59)
    mask_right = np.eye(18)[[0 * 6 + 0 * 3 + 0, 2 * 6 + 1 * 3 + 0]] * 0.9 + 0.005  # mask right, gender/age wrong
    rest_right = np.eye(18)[[1 * 6 + 1 * 3 + 2, 1 * 6 + 0 * 3 + 1]] * 0.9 + 0.005  # gender/age right, mask wrong
    probs = np.stack([mask_right, rest_right])
    classes, _ = ensemble.ensemble(probs, [1, 1], head_weights={"mask": [1, 0], "gender": [0, 1], "age": [0, 1]})
    assert classes.tolist() == truth.tolist()
    assert ensemble.ensemble(probs, [1, 1])[0].tolist() != truth.tolist()  # one weight per input cannot
    with pytest.raises(ValueError, match="needs 2 non-negative weights"):
        ensemble.parse_head_weights(["mask=1,0,0"], 2)
    with pytest.raises(ValueError, match="HEAD one of mask, gender, age"):
        ensemble.parse_head_weights(["nose=1,0"], 2)


def test_select_per_head_picks_the_input_best_on_each_head(tmp_path, capsys):
    """Run 'a' is right on mask only, run 'b' on gender and age only (constructed val_probs.csv)."""
    truth = np.array([c for c in range(18)] * 3)
    mask, gender, age = truth // 6, truth // 3 % 2, truth % 3
    runs = []
    for name, right in (("a", "mask"), ("b", "rest")):
        folder = tmp_path / name
        folder.mkdir()
        predicted = np.where(right == "mask", mask * 6 + (1 - gender) * 3 + (age + 1) % 3,
                             ((mask + 1) % 3) * 6 + gender * 3 + age)
        probs = np.eye(18)[predicted] * 0.9 + 0.1 / 18
        frame = probability_frame([f"p/{i}.jpg" for i in range(len(truth))], probs).assign(ans=truth)
        frame.to_csv(folder / "val_probs.csv", index=False)
        runs.append(folder)
    weights, lines = ensemble.select_per_head(runs)
    assert weights == {"mask": [1.0, 0.0], "gender": [0.0, 1.0], "age": [0.0, 1.0]}
    assert lines[0].startswith(f"mask: {runs[0]}") and lines[1].startswith(f"gender: {runs[1]}")
    with pytest.raises(FileNotFoundError, match="not a run folder with val_probs.csv"):
        ensemble.select_per_head([tmp_path])
