"""A user's first hour (issue 51): no silent wrong result, one line instead of a traceback, and a fresh
clone with no ../shared that trains, crops faces and predicts as the README says."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, printed_lines, run_script, start_forked

import audit
import ensemble
import inference
import model
import report
import train

FAST = ["--resize", "32", "24", "--num_workers", "0", "--batch_size", "32", "--model", "test_resnet",
        "--pretrained", "none", "--report", "off", "--epochs", "1", "--amp", "off"]


def error_of(call) -> str:
    """The one-line message of the SystemExit that `call()` ends with."""
    with pytest.raises(SystemExit) as stop:
        call()
    message = str(stop.value.code)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """A finished run on a copy of the tiny train folder, with the eval folder beside it."""
    root = tmp_path_factory.mktemp("first_hour")
    shutil.copytree(tiny_data / "train", root / "data" / "train")
    shutil.copytree(tiny_data / "eval", root / "data" / "eval")
    train.main(["--data_dir", str(root / "data" / "train"), "--model_dir", str(root / "model"), *FAST])
    return root


def test_the_run_header_names_the_model_and_a_random_init(trained, tmp_path, tiny_data, capsys):
    train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path), *FAST])
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("model test_resnet (three_head), weights random init (--pretrained none); input 32x24, "
                             "epochs 1, batch 32, lr 0.001")


def test_pretrained_weights_that_cannot_be_had_stop_before_any_work(tmp_path, tiny_data, monkeypatch):
    """--pretrained auto (the default) on a timm name means timm's weights; offline, one line naming
    --pretrained none, and no run folder."""
    monkeypatch.setattr(model, "is_cached", lambda where, location: False)

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(socket, "create_connection", offline)
    args = [a for a in FAST if a not in ("--pretrained", "none")]
    argv = ["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path), *args]
    message = error_of(lambda: train.main(argv))
    assert "timm/test_resnet" in message and "--pretrained none" in message
    assert not any(tmp_path.iterdir())
    assert model.weights_line("resnet18", True) == "timm's pretrained timm/resnet18.a1_in1k"
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(model, "is_cached", lambda where, location: True)  # downloaded once, now offline:
    assert model.fetch_pretrained("test_resnet") == "timm/test_resnet.r160_in1k"
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # timm loads the cached file without the hub's retries


def test_inference_without_data_dir_predicts_the_eval_folder_beside_the_runs_training_folder(trained, tmp_path,
                                                                                              capsys):
    inference.main(["--model_dir", str(trained / "model"), "--output_dir", str(tmp_path / "first"), "--num_workers",
                    "0", "--amp", "off"])
    assert f"images of {trained / 'data' / 'eval'} (beside the run's training folder" in capsys.readouterr().out
    shutil.copytree(trained / "model", tmp_path / "model")
    config = json.loads((tmp_path / "model" / "exp" / "config.json").read_text())
    config["spec"]["data_dir"] = str(tmp_path / "elsewhere" / "train")  # trained where no eval/ is beside it
    (tmp_path / "model" / "exp" / "config.json").write_text(json.dumps(config))
    for call in (lambda: inference.main(["--model_dir", str(tmp_path / "model"), "--output_dir", str(tmp_path)]),
                 lambda: ensemble.main([str(tmp_path / "model" / "exp"), "--output_dir", str(tmp_path)])):
        message = error_of(call)
        assert "--data_dir" in message and str(tmp_path / "elsewhere" / "eval") in message
    assert not (tmp_path / "submission.csv").exists() and not (tmp_path / "ensemble.csv").exists()


def test_resume_refuses_flags_it_cannot_change_and_says_the_ones_it_does(trained, tmp_path, capsys):
    shutil.copytree(trained / "model", tmp_path / "model")
    run = str(tmp_path / "model" / "exp")
    message = error_of(lambda: train.main(["--resume", run, "--lr", "1e-4", "--model", "efficientnet_lite0"]))
    assert "--lr (run: 0.001)" in message and "--model (run: test_resnet)" in message and "--epochs" in message
    train.main(["--resume", run, "--epochs", "2", "--lr", "0.001"])  # the run's own value is no change
    assert "changed on resume: --epochs 1 -> 2" in capsys.readouterr().out
    assert "not found" in error_of(lambda: train.main(["--resume", str(tmp_path / "nothere")]))
    best = error_of(lambda: train.main(["--resume", f"{run}/best.pth"]))  # no optimizer state to continue from
    assert "is not a run's last.pth" in best and f"--resume {run}" in best
    train.main(["--resume", f"{run}/last.pth", "--epochs", "3"])  # the file itself: its folder's run
    assert "changed on resume: --epochs 2 -> 3" in capsys.readouterr().out


@pytest.mark.parametrize("tool, argv", [(train.build_parser, ["--epoch", "3"]),
                                        (inference.build_parser, ["--model", "resnet18"]),
                                        (ensemble.build_parser, ["run", "--weight", "1"]),
                                        (audit.build_parser, ["run", "--out", "x"])])
def test_abbreviated_flags_are_refused(tool, argv, capsys):
    with pytest.raises(SystemExit):
        tool().parse_args(argv)
    assert "unrecognized arguments" in capsys.readouterr().err


def test_every_tools_help_shows_each_default_once_and_whole_sentences(capsys):
    for parser in (train.build_parser(), inference.build_parser(), ensemble.build_parser(), audit.build_parser()):
        for action in parser._actions:
            assert action.help, f"{parser.prog} {action.option_strings}: no help"
        text = parser.format_help()
        assert "(default: (default" not in text and text.count("default: default") == 0
        assert parser.description.endswith("."), parser.description
        for action in parser._actions:
            if action.option_strings and action.help:
                words = " ".join(action.help.split()).replace("%%", "%")
                assert words.lower().count("default") <= 1


def baseline_run(folder) -> Path:
    """A run folder as the competition baseline writes it: config.json = vars(args), best.pth a state dict."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(dict(seed=42, epochs=1, dataset="MaskBaseDataset", model="BaseModel",
                                                        resize=[128, 96], lr=1e-3, name="exp", model_dir="./model")))
    torch.save({"conv1.weight": torch.zeros(1)}, folder / "best.pth")
    return folder


def test_baseline_and_old_run_folders_get_one_line_from_every_tool(trained, tmp_path):
    foreign = baseline_run(tmp_path / "model" / "baseline")
    calls = [lambda: inference.main(["--model_dir", str(foreign), "--output_dir", str(tmp_path)]),
             lambda: ensemble.main([str(foreign), "--output_dir", str(tmp_path)]),
             lambda: report.main([str(foreign)]),
             lambda: audit.main([str(foreign), "--output_dir", str(tmp_path / "audit")])]
    for call in calls[:3]:
        assert "not a run of this toolkit" in error_of(call)
    assert "has no val_probs.csv" in error_of(calls[3])  # audit reads out-of-fold probabilities alone
    # the newest-run pick passes over it: the run of this toolkit beside it is predicted
    shutil.copytree(trained / "model" / "exp", tmp_path / "model" / "exp")
    os.utime(foreign / "best.pth")
    assert inference.newest_run(tmp_path / "model") == tmp_path / "model" / "exp"
    # a run written before config.json kept model_args (2026-11-26) still predicts, its spec read from its flags
    config = json.loads((tmp_path / "model" / "exp" / "config.json").read_text())
    del config["model_args"], config["spec"]
    (tmp_path / "model" / "exp" / "config.json").write_text(json.dumps(config))
    probs = inference.main(["--model_dir", str(tmp_path / "model" / "exp"), "--output_dir", str(tmp_path / "old"),
                            "--data_dir", str(trained / "data" / "eval"), "--num_workers", "0", "--amp", "off"])
    assert probs.shape[1] == 18


def test_ctrl_c_ends_training_with_status_130_and_one_line(tmp_path, tiny_data):
    stdout, stderr = tmp_path / "out.txt", tmp_path / "err.txt"
    args = ["--data_dir", tiny_data / "train", "--model_dir", tmp_path / "model", *FAST, "--epochs", "200",
            "--log_interval", "1"]
    process = start_forked(run_script, ROOT / "train.py", *args, stdout=stdout, stderr=stderr)
    for line in printed_lines(stdout, process):
        if line.startswith("epoch 1/200"):
            os.kill(process.pid, signal.SIGINT)
            break
    process.join(120)
    errors = stderr.read_text()
    assert process.exitcode == 130, errors
    assert "Traceback" not in errors and "last.pth holds the" in errors and "--resume" in errors


def test_a_fresh_clone_without_shared_trains_with_face_crop_and_predicts(tmp_path):
    """The tracked files copied to a folder with no ../shared beside it, as `git clone` gives them: the
    bundled detector serves --face_crop with no flag, and inference finds the eval/ beside the sample."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    clone = tmp_path / "masktrain"
    for name in files:
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    assert not (tmp_path / "shared").exists()
    env = {**os.environ, "PYTHONPATH": ""}
    subprocess.run([sys.executable, "train.py", *FAST, "--face_crop"], cwd=clone, env=env, check=True,
                   capture_output=True, text=True)
    done = subprocess.run([sys.executable, "inference.py", "--num_workers", "0", "--amp", "off"], cwd=clone, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "faces: found in" in done.stdout and (clone / "output" / "submission.csv").is_file()
    assert str(clone / "sample_data" / "eval") in done.stdout


def test_a_vit_source_made_for_another_size_trains_and_predicts_at_the_runs_resize(tmp_path, tiny_data):
    """A timm-format face ViT from the hub (e.g. hf-hub:gaunernst/vit_small_patch8_gap_112.cosface_ms1mv3) is
    built for one input size: a tiny random local-dir ViT made for 160 px trains at --resize 64 48 (timm's
    img_size, its position embeddings resampled) and inference rebuilds it at that size."""
    import timm
    from safetensors.torch import save_file
    vit = timm.create_model("test_vit", pretrained=False, num_classes=0)
    folder = tmp_path / "vit"
    folder.mkdir()
    save_file({key: value.contiguous() for key, value in vit.state_dict().items()}, folder / "model.safetensors")
    cfg = dict(input_size=[3, 160, 160], mean=[0.5] * 3, std=[0.5] * 3, interpolation="bicubic", num_classes=0)
    (folder / "config.json").write_text(json.dumps(dict(architecture="test_vit", num_classes=0,
                                                        model_args=dict(img_size=160), pretrained_cfg=cfg)))
    args = [a for a in FAST if a not in ("test_resnet", "--pretrained", "none")]
    args[args.index("--resize") + 1: args.index("--resize") + 3] = ["64", "48"]
    args[args.index("--model") + 1: args.index("--model") + 1] = [f"local-dir:{folder}"]
    train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path / "model"), *args])
    config = json.loads((tmp_path / "model" / "exp" / "config.json").read_text())
    assert config["model_args"]["img_size"] == [64, 48]
    probs = inference.main(["--model_dir", str(tmp_path / "model"), "--data_dir", str(tiny_data / "eval"),
                            "--output_dir", str(tmp_path / "out"), "--num_workers", "0", "--amp", "off"])
    assert probs.shape == (len(list((tiny_data / "eval" / "images").iterdir())), 18)


def test_wandb_without_a_login_is_one_line_before_any_work(tmp_path, tiny_data, monkeypatch):
    import wandb
    monkeypatch.setattr(wandb, "login", lambda **kwargs: False)
    message = error_of(lambda: train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path),
                                           *FAST, "--wandb"]))
    assert "wandb login" in message and "--wandb_mode offline" in message and not any(tmp_path.iterdir())


def test_backbones_without_multi_backbone_is_an_error(tiny_data):
    import flags
    args = flags.parse_args(["--data_dir", str(tiny_data / "train"), "--backbones", "age=test_resnet"])
    with pytest.raises(flags.FlagError, match="--backbones needs --kind multi_backbone"):
        flags.validate(args)


def test_a_run_folder_saved_before_the_spec_predicts_and_ensembles(tmp_path, tiny_data):
    """tests/fixtures/run_9eee33f: config.json, best.pth and log.csv of a test_resnet run written by the code
    of commit 9eee33f (2026-12-02, before config.json held a spec); its spec comes from that version's flags."""
    from spec import RunSpec
    fixture = ROOT / "tests" / "fixtures" / "run_9eee33f"
    config = json.loads((fixture / "config.json").read_text())
    assert "spec" not in config
    spec = RunSpec.of(config)
    assert (spec.preprocess.resize, spec.model_args["model"], spec.preprocess.face) == ((32, 24), "test_resnet", None)
    run = tmp_path / "old"
    shutil.copytree(fixture, run)
    common = ["--data_dir", str(tiny_data / "eval"), "--num_workers", "0", "--amp", "off"]
    probs = inference.main(["--model_dir", str(run), "--output_dir", str(tmp_path / "out"), *common])
    assert probs.shape == (len(list((tiny_data / "eval" / "images").iterdir())), 18)
    classes = ensemble.main([str(run), str(run), "--output_dir", str(tmp_path / "out"), *common])
    assert list(classes) == list(probs.argmax(1))
    assert "learning curves" in report.main([str(run), "--no_cams"]).read_text().lower()


def test_keep_last_off_leaves_best_pth_alone_and_resume_says_why(tmp_path, tiny_data):
    train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path), *FAST, "--keep_last", "off"])
    assert sorted(p.name for p in (tmp_path / "exp").glob("*.pth")) == ["best.pth"]
    assert "--keep_last off" in error_of(lambda: train.main(["--resume", str(tmp_path / "exp")]))


@pytest.mark.parametrize("script, argv", [("faces.py", ["sample_data", "--face_det", "x"]),
                                          ("synthesize.py", ["--data", "x", "--out_dir", "y"]),
                                          ("sample.py", ["out", "--n_peo", "3"])])
def test_the_other_scripts_refuse_abbreviations_too(script, argv):
    done = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and ("unrecognized arguments" in done.stderr or "required: --data_dir" in done.stderr)


def test_a_face_crop_runs_spec_reads_back_equal_and_hashable():
    """The spec train.py writes, read back from JSON, equals the one it was made from (tuples, not lists)."""
    from spec import RunSpec
    config = json.loads((ROOT / "tests" / "fixtures" / "run_9eee33f" / "config.json").read_text())
    config.update(face_crop=True, face_detector="weights/face_detection_yunet_2026may.onnx", face_score=0.5,
                  face_margin=1.05, faces=dict(fallback=[0.5, 0.4, 0.3]))
    spec = RunSpec.from_flags(config)
    again = RunSpec.of({**config, "spec": json.loads(json.dumps(spec.to_json()))})
    assert again == spec and hash(again.preprocess) == hash(spec.preprocess)
    assert again.preprocess.face.fallback == (0.5, 0.4, 0.3)


def test_the_training_options_default_to_train_pys_flags_and_old_runs_read_theirs():
    """TrainOptions' defaults (what an older config.json lacks) are train.py's; an older run's own values win."""
    import flags
    from spec import RunSpec, TrainOptions
    assert TrainOptions() == TrainOptions.from_flags(vars(flags.build_parser().parse_args([])))
    config = json.loads((ROOT / "tests" / "fixtures" / "run_9eee33f" / "config.json").read_text())
    spec = RunSpec.of(config)
    assert (spec.training.epochs, spec.training.batch_size, spec.training.report) == (1, 64, "off")
    assert spec.starting_weights == {"test_resnet": "--pretrained auto"} and spec.device_type == "cpu"
    older = {key: value for key, value in config.items() if key not in ("mix_prob", "keep_last", "clip_mode")}
    assert RunSpec.of(older).training.mix_prob == TrainOptions().mix_prob
    refused = RunSpec.of(dict(config, warmup_epochs=5))  # a value an older version let through: not readable
    assert refused.training is None and refused.model_args == spec.model_args
    stored = RunSpec.from_flags(config).to_json()
    stored["training"].update(warmup_epochs=5, renamed_later=1)  # a v3 spec a later version reads
    assert RunSpec.of(dict(config, spec=stored)).training is None
    stored["training"].update(warmup_epochs=0)
    assert RunSpec.of(dict(config, spec=stored)).training == spec.training  # an unknown field is left out
    with pytest.raises(ValueError, match="--warmup_epochs must be in"):
        TrainOptions(epochs=2, warmup_epochs=2)


def test_ctrl_c_outside_the_loop_is_one_line_and_status_130(capsys):
    from runs import run_command

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        run_command(interrupted)
    assert stop.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"
