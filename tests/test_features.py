from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import inference
import train
from features import FromFeatures, adapt_batch_norms, check_supported
from model import build_model, freeze
from runs import read_run

FAST = ["--resize", "64", "48", "--num_workers", "0", "--batch_size", "32", "--model", "test_efficientnet",
        "--pretrained", "none",
        "--report", "off", "--freeze", "3", "--cache_features"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """One weights file, so that runs of any seed share their frozen stages (as with ImageNet weights)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "test_efficientnet.safetensors"
    save_file(timm.create_model("test_efficientnet").state_dict(), str(path))
    return path


def test_from_features_gives_the_models_outputs():
    torch.manual_seed(0)
    model = build_model("three_head", "test_efficientnet", age_years=True)
    freeze(model, "3")
    rest = FromFeatures(model)
    assert len(rest.frozen) > 2 and rest.rest  # the stem and some stages frozen, the others not
    model.eval()
    images = torch.randn(4, 3, 64, 48)
    expected = model(images)
    with torch.no_grad():
        features = rest.frozen(images)
    got = rest(features)
    assert set(got) == set(expected) == {"mask", "gender", "age", "years"}
    for head in expected:
        torch.testing.assert_close(got[head], expected[head])


def test_adapted_batch_norms_hold_the_data_statistics():
    model = build_model("three_head", "test_efficientnet")
    freeze(model, "3")
    frozen = FromFeatures(model).frozen
    images = torch.randn(64, 3, 32, 32) * 3 + 2
    adapt_batch_norms(frozen, [(images[:32], None), (images[32:], None)])
    stem_norm = frozen[1]
    pixels = frozen[0](images).transpose(0, 1).reshape(stem_norm.num_features, -1)
    torch.testing.assert_close(stem_norm.running_mean, pixels.mean(1), rtol=1e-4, atol=1e-4)
    assert not frozen.training and stem_norm.momentum == 0.1


def test_which_models_can_train_on_features():
    model = build_model("three_head", "test_efficientnet")
    assert check_supported(model) == "--cache_features needs --freeze N to leave the backbone's stem frozen"
    freeze(model, "3")
    assert check_supported(model) == ""
    assert "ResNet" in check_supported(build_model("three_head", "test_resnet"))
    assert "shared" in check_supported(build_model("multi_backbone", "test_efficientnet"))


def test_runs_share_the_features_and_predict_as_usual(tmp_path, tiny_data, weights):
    cache = tmp_path / "cache"
    common = ["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path), "--cache_dir", str(cache),
              "--epochs", "2", *FAST, "--pretrained", str(weights)]
    train.main([*common, "--name", "a", "--seed", "1"])
    files = sorted(cache.glob("*.features"))
    assert len(files) == 1
    built = files[0].stat().st_mtime_ns
    train.main([*common, "--name", "b", "--seed", "2", "--val_ratio", "0"])  # another split: its own features
    adapted = {path: path.stat().st_mtime_ns for path in cache.glob("*.adabn.pt")}
    train.main([*common, "--name", "c", "--seed", "3", "--val_ratio", "0"])  # ... which this run reuses
    assert len(list(cache.glob("*.features"))) == 2 and files[0].stat().st_mtime_ns == built
    assert len(adapted) == 2 and {p: p.stat().st_mtime_ns for p in cache.glob("*.adabn.pt")} == adapted
    states = [read_run(tmp_path / name, "best")[1]["model"] for name in ("b", "c")]
    key = next(k for k in states[0] if k.endswith("bn1.running_mean"))
    init = build_model("three_head", "test_efficientnet", pretrained=str(weights)).state_dict()[key]
    torch.testing.assert_close(states[0][key], states[1][key])  # the same adapted statistics ...
    assert not torch.allclose(states[0][key], init)  # ... which are the faces', not the initial ones
    assert not torch.equal(states[0]["heads.age.1.weight"], states[1]["heads.age.1.weight"])
    inference.main(["--model_dir", str(tmp_path / "c"), "--data_dir", str(tiny_data / "eval"),
                    "--output_dir", str(tmp_path / "out"), "--num_workers", "0"])
    assert (tmp_path / "out" / "submission.csv").is_file()


@pytest.mark.parametrize("flags, message", [
    ([], "needs --freeze N"),
    (["--freeze", "3", "--mixup", "0.2", "--grayscale", "0.1"], "drop --grayscale, --mixup$"),
    (["--freeze", "3", "--augmentation", "AlbumentationsAugmentation"], "a mirror flip only"),
    (["--freeze", "3", "--model", "test_resnet", "--pretrained", "none"], "EfficientNet family"),
])
def test_flags_that_do_not_fit_are_one_line_errors(tmp_path, tiny_data, flags, message):
    with pytest.raises(SystemExit, match=message):
        train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path / "model"),
                    "--cache_dir", str(tmp_path / "cache"), "--cache_features",
                    "--model", "test_efficientnet", "--pretrained", "none", "--resize", "64", "48",
                        "--num_workers", "0", *flags])
    assert not (tmp_path / "model").exists() or not any((tmp_path / "model").iterdir())


def test_an_ensemble_runs_the_shared_frozen_stages_once(tmp_path, tiny_data, weights):
    common = ["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path), "--cache_dir",
              str(tmp_path / "cache"), "--epochs", "1", "--val_ratio", "0", *FAST, "--pretrained", str(weights)]
    for seed in (1, 2):
        train.main([*common, "--name", f"m{seed}", "--seed", str(seed)])
    paths = sorted(str(p) for p in (tiny_data / "eval" / "images").iterdir())
    options = inference.PredictOptions(tta="hflip", num_workers=0, amp="off")
    shared = inference.FrozenStages()
    for run in ("m1", "m2"):
        full = inference.Predictor(tmp_path / run, options).predict(paths)
        fast = inference.Predictor(tmp_path / run, options, shared).predict(paths)
        np.testing.assert_allclose(fast, full, atol=1e-5)
    assert len(shared.outputs) == 1 and next(iter(shared.outputs.values())).shape[:2] == (len(paths), 2)
    mixed = inference.FrozenStages()  # --amp auto may time bf16 for one member and fp32 for the next
    inference.Predictor(tmp_path / "m1", replace(options, amp="bf16"), mixed).predict(paths)
    fast = inference.Predictor(tmp_path / "m2", options, mixed).predict(paths)
    np.testing.assert_allclose(fast, full, atol=0.05)
