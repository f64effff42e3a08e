"""Recipe options: soft age targets from the exact age, and macro-F1 offsets fitted on validation."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import ensemble
import inference
import train
from loss import SoftAgeLoss
from metrics import apply_offsets, fit_offsets, macro_f1


def test_soft_age_targets_know_distance():
    targets = SoftAgeLoss(sigma=3.0).soft_targets(torch.tensor([20, 29, 30, 45, 59, 75]))
    assert torch.allclose(targets.sum(1), torch.ones(6))
    assert targets[0, 0] > 0.99 and targets[3, 1] > 0.99 and targets[5, 2] > 0.99
    assert 0.3 < targets[1, 1] < 0.5 and 0.3 < targets[2, 0] < 0.5 and targets[4, 2] > 0.3
    sharp = SoftAgeLoss(sigma=0.01).soft_targets(torch.tensor([29, 30, 60]))
    assert torch.equal(sharp.argmax(1), torch.tensor([0, 1, 2])) and sharp.max(1).values.min() > 0.999
    logits = torch.zeros(2, 3, requires_grad=True)
    SoftAgeLoss()(logits, torch.tensor([25, 70])).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_age_soft_trains_and_is_checked(tmp_path, tiny_data):
    flags = ["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path), "--model", "test_resnet",
             "--resize", "32", "24", "--num_workers", "0", "--epochs", "1", "--report", "off"]
    scores = train.main(flags + ["--age_soft", "3"])
    assert 0 <= scores[0] <= 1 and json.loads((tmp_path / "exp" / "config.json").read_text())["age_soft"] == 3
    with pytest.raises(SystemExit, match="--age_soft needs"):
        train.main(flags + ["--age_soft", "3", "--kind", "single_head"])


def test_offsets_raise_macro_f1_of_under_predicted_classes():
    rng = np.random.default_rng(0)
    targets = rng.choice(18, 3000)
    probs = rng.dirichlet(np.ones(18), 3000) + 0.15 * np.eye(18)[targets]
    probs[:, 15:] *= 0.3  # three classes an argmax under-predicts
    probs /= probs.sum(1, keepdims=True)
    offsets = fit_offsets(targets, probs)
    adjusted = apply_offsets(probs, offsets)
    assert np.allclose(adjusted.sum(1), 1) and offsets[15:].min() > offsets[:15].max()
    assert macro_f1(targets, adjusted.argmax(1)) > macro_f1(targets, probs.argmax(1)) + 0.05


def test_calibrate_in_inference_and_ensemble(tmp_path, tiny_data):
    train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path / "runs"), "--model",
                "test_resnet", "--resize", "32", "24", "--num_workers", "0", "--epochs", "2", "--report", "off"])
    run_dir = tmp_path / "runs" / "exp"
    common = ["--data_dir", str(tiny_data / "eval"), "--output_dir", str(tmp_path / "out"), "--num_workers", "0"]
    inference.main(["--model_dir", str(run_dir), *common, "--calibrate", "--name", "calibrated.csv"])
    offsets = json.loads((tmp_path / "out" / "calibrated_offsets.json").read_text())
    assert len(offsets) == 18
    ensemble.main([str(run_dir), *common, "--calibrate", "--name", "ens.csv"])
    assert (tmp_path / "out" / "ens_offsets.json").is_file()
    probs_file = tmp_path / "out" / "calibrated_probs.csv"
    assert len(pd.read_csv(probs_file)) == len(pd.read_csv(tiny_data / "eval" / "info.csv"))
    with pytest.raises(SystemExit, match="--calibrate fits on run folders"):
        ensemble.main([str(probs_file), *common, "--calibrate", "--name", "files.csv"])


def test_val_ratio_0_trains_on_every_person(tmp_path, tiny_data):
    flags = ["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path / "runs"), "--model", "test_resnet",
             "--resize", "32", "24", "--num_workers", "0", "--epochs", "2", "--val_ratio", "0",
             "--kind", "three_head", "--dataset", "MultiLabelDataset", "--age_soft", "3"]
    scores = train.main(flags)
    run_dir = tmp_path / "runs" / "exp"
    log = pd.read_csv(run_dir / "log.csv")
    n_images = len(list((tiny_data / "train" / "images").glob("*/*.*")))
    assert np.isnan(scores[0]) and len(log) == 2 and "val_f1" not in log
    assert (log["images_per_second"] * log["epoch_seconds"]).round().eq(n_images).all()  # every image, every epoch
    best, last = (torch.load(run_dir / f"{n}.pth", weights_only=False) for n in ("best", "last"))
    assert best["epoch"] == 2 and all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])
    assert not (run_dir / "val_probs.csv").exists() and "no validation" in (run_dir / "report.html").read_text()
    common = ["--model_dir", str(run_dir), "--data_dir", str(tiny_data / "eval"), "--output_dir", str(tmp_path / "out"),
              "--num_workers", "0"]
    inference.main(common)
    assert (tmp_path / "out" / "submission.csv").is_file()
    with pytest.raises(SystemExit, match="has no val_probs.csv to fit the offsets on"):
        inference.main(common + ["--calibrate", "--name", "cal.csv"])
    assert not (tmp_path / "out" / "cal.csv").exists()
    with pytest.raises(SystemExit, match="--early_stop needs validation"):
        train.main(flags + ["--early_stop", "2"])
