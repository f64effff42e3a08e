"""timm model sources (`local-dir:FOLDER`) as --model: a tiny folder made here from a timm test model
trains, predicts, ensembles and reports from the run folder alone; bad folders are one-line errors."""
import json
import shutil

import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

import audit
import ensemble
import inference
import report
import train
from flags import FlagError, parse_args, validate
from model import build_model, freeze, preprocessing

MEAN, STD = [0.5, 0.4, 0.3], [1 / 255] * 3  # like the face backbone's: std 1/255 on timm's 0..1 scale


def make_source(folder, architecture="test_efficientnet", state=None, config=True):
    """A timm local-dir folder: config.json (architecture, pretrained_cfg with its own mean/std) and
    model.safetensors (a timm model's weights)."""
    folder.mkdir(parents=True)
    net = timm.create_model("test_efficientnet", num_classes=0)
    if config:
        (folder / "config.json").write_text(json.dumps(dict(
            architecture=architecture, num_classes=0, model_args={},
            pretrained_cfg=dict(input_size=[3, 64, 64], interpolation="bilinear", mean=MEAN, std=STD,
                                num_classes=0, classifier="classifier"))))
    save_file(state if state is not None else {k: v.contiguous() for k, v in net.state_dict().items()},
              str(folder / "model.safetensors"))
    return folder, net


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("src") / "face_model")


def test_a_source_loads_its_own_weights_and_preprocessing(source):
    folder, net = source
    model = build_model("three_head", f"local-dir:{folder}", pretrained="auto")
    loaded = model.backbones["shared"].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
    prep = preprocessing(model)
    assert prep["mean"] == pytest.approx(MEAN) and prep["std"] == pytest.approx(STD)
    random_init = build_model("three_head", f"local-dir:{folder}", pretrained="none").backbones["shared"]
    assert not torch.equal(random_init.state_dict()["conv_stem.weight"], net.state_dict()["conv_stem.weight"])
    trainable, total = freeze(model, "2")
    assert 0 < trainable < total


def test_a_source_run_is_self_contained(source, tiny_data, tmp_path):
    folder, _ = source
    copy = tmp_path / "copy_of_source"
    shutil.copytree(folder, copy)
    runs = tmp_path / "runs"
    common = ["--data_dir", str(tiny_data / "train"), "--model_dir", str(runs), "--resize", "64", "48",
              "--num_workers", "0", "--epochs", "1", "--batch_size", "32", "--report", "off"]
    train.main([*common, "--model", f"local-dir:{copy}", "--freeze", "3", "--name", "face"])
    config = json.loads((runs / "face" / "config.json").read_text())
    assert config["preprocessing"]["std"] == pytest.approx(STD)
    assert config["model_args"]["sources"][f"local-dir:{copy}"]["architecture"] == "test_efficientnet"
    shutil.rmtree(copy)  # the weights folder is gone: everything below rebuilds from the run folder
    out = tmp_path / "out"
    inference.main(["--model_dir", str(runs / "face"), "--data_dir", str(tiny_data / "eval"),
                    "--output_dir", str(out), "--num_workers", "0"])
    info = pd.read_csv(tiny_data / "eval" / "info.csv")
    assert pd.read_csv(out / "submission.csv")["ImageID"].tolist() == info["ImageID"].tolist()
    train.main([*common, "--model", "test_resnet", "--pretrained", "none", "--name", "plain"])
    ensemble.main([str(runs / "face"), str(runs / "plain"), "--data_dir", str(tiny_data / "eval"),
                   "--output_dir", str(out), "--num_workers", "0"])
    assert len(pd.read_csv(out / "ensemble.csv")) == len(info)
    report.main([str(runs / "face")])
    assert (runs / "face" / "report.html").stat().st_size > 0


def test_audit_runs_on_a_source_model(source, tiny_data, tmp_path):
    folder, _ = source
    runs = tmp_path / "runs"
    train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(runs), "--resize", "64", "48",
                "--num_workers", "0", "--epochs", "1", "--batch_size", "32", "--report", "off",
                "--model", f"local-dir:{folder}", "--n_folds", "2", "--name", "cv"])
    out = tmp_path / "audit"
    audit.main([str(runs / "cv_fold0"), str(runs / "cv_fold1"), "--data_dir", str(tiny_data / "train"),
                "--output_dir", str(out)])
    assert any(out.iterdir())


@pytest.mark.parametrize("make, message", [
    (lambda f: make_source(f, config=False), "has no config.json"),
    (lambda f: make_source(f, architecture="no_such_net"), "unknown architecture 'no_such_net'"),
    (lambda f: make_source(f, state={"conv_stem.weight": torch.zeros(3, 3, 1, 1)}), "do not load"),
    (lambda f: None, "model folder not found"),
])
def test_bad_source_folders_are_one_line_errors(tiny_data, tmp_path, make, message):
    folder = tmp_path / "bad_source"
    make(folder)
    args = parse_args(["--data_dir", str(tiny_data / "train"), "--model", f"local-dir:{folder}"])
    with pytest.raises((FlagError, RuntimeError, ValueError, FileNotFoundError)) as error:
        validate(args)
        build_model("three_head", args.model, pretrained="auto")
    text = str(error.value)
    assert message in text and str(folder) in text and "\n" not in text


def test_hf_hub_offline_is_a_one_line_error(tiny_data, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: no 20 s connect timeout
    args = parse_args(["--data_dir", str(tiny_data / "train"), "--model", "hf-hub:someone/no_such_model"])
    with pytest.raises(FlagError, match="could not download its config.json .*local-dir:FOLDER"):
        validate(args)


def test_a_source_trains_on_cached_features(source, tiny_data, tmp_path):
    folder, _ = source
    runs = tmp_path / "runs"
    train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(runs), "--resize", "64", "48",
                "--num_workers", "0", "--epochs", "1", "--batch_size", "32", "--report", "off", "--cache_dir",
                str(tmp_path / "cache"), "--model", f"local-dir:{folder}", "--freeze", "2", "--cache_features"])
    assert list((tmp_path / "cache").glob("*.features"))
    assert json.loads((runs / "exp" / "config.json").read_text())["preprocessing"]["std"] == pytest.approx(STD)
