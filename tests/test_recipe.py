"""Recipe options: soft age targets and the years head from the exact age, and macro-F1 offsets fitted on validation."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import ensemble
import inference
import report
import train
from loss import AgeYearsLoss, SoftAgeLoss, create_multi_head_loss
from metrics import apply_offsets, fit_offsets, macro_f1
from model import build_model


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
             "--pretrained", "none",
             "--resize", "32", "24", "--num_workers", "0", "--epochs", "1", "--report", "off"]
    scores = train.main(flags + ["--age_soft", "3"])
    assert 0 <= scores[0] <= 1 and json.loads((tmp_path / "exp" / "config.json").read_text())["age_soft"] == 3
    with pytest.raises(SystemExit, match="--age_soft needs"):
        train.main(flags + ["--age_soft", "3", "--kind", "single_head"])


def test_years_head_starts_near_forty_and_learns_from_the_exact_age():
    model = build_model("three_head", "test_resnet", age_years=True)
    outputs = model(torch.randn(4, 3, 32, 24))
    assert set(outputs) == {"mask", "gender", "age", "years"} and outputs["years"].shape == (4,)
    assert (outputs["years"] - 40).abs().max() < 20
    criterion = create_multi_head_loss(age_soft=3, age_years=0.5)
    targets = torch.tensor([[0, 1, 0, 25], [2, 0, 1, 45], [1, 1, 2, 70], [0, 0, 0, 18]])
    total, parts = criterion(outputs, targets)
    assert set(parts) == {"mask", "gender", "age", "years"} and criterion.weights["years"] == 0.5
    assert torch.isclose(parts["years"], (outputs["years"] - targets[:, 3]).abs().mean() / 10)
    total.backward()
    assert model.heads["years"][1].weight.grad.abs().sum() > 0
    assert AgeYearsLoss()(torch.tensor([30.0]), torch.tensor([50])) == 2
    with pytest.raises(ValueError, match="needs kind three_head"):
        build_model("single_head", "test_resnet", age_years=True)
    with pytest.raises(ValueError, match="need the exact age"):
        criterion(outputs, targets[:, :3])


def test_age_years_writes_predicted_ages_for_the_audit_and_is_checked(tmp_path, tiny_data):
    flags = ["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path), "--model", "test_resnet",
             "--pretrained", "none",
             "--resize", "32", "24", "--num_workers", "0", "--epochs", "1", "--report", "off"]
    train.main(flags + ["--age_years", "0.5", "--n_folds", "2", "--name", "cv"])
    probs = pd.concat([pd.read_csv(tmp_path / f"cv_fold{k}" / "val_probs.csv") for k in range(2)])
    assert probs["age_years"].between(0, 120).all() and len(probs) == 24 * 7
    log = pd.read_csv(tmp_path / "cv_fold0" / "log.csv")
    assert {"train_loss_years", "val_years_mae"} <= set(log) and log["val_years_mae"].iloc[0] > 0
    out = tmp_path / "eval"
    inference.main(["--model_dir", str(tmp_path / "cv_fold0"), "--data_dir", str(tiny_data / "eval"),
                    "--output_dir", str(out), "--num_workers", "0"])
    assert len(pd.read_csv(out / "submission.csv")) == len(pd.read_csv(tiny_data / "eval" / "info.csv"))
    assert "<img" in report.main([str(tmp_path / "cv_fold0")]).read_text()  # class activation maps of the heads
    with pytest.raises(SystemExit, match="--age_years needs"):
        train.main(flags + ["--age_years", "1", "--kind", "multi_backbone"])


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
                "test_resnet", "--pretrained", "none", "--resize", "32", "24", "--num_workers", "0", "--epochs",
                    "2", "--report", "off"])
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
    flags = ["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path / "runs"), "--model",
             "test_resnet", "--pretrained", "none",
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
