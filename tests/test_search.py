"""Augmentation flags and search.py: grids into run folders, resuming, two processes on one study,
pruning, and one-line errors for bad spaces and databases."""
import json
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import printed_lines, start_forked

import search
import train
from augment import AUGMENTATIONS, create_transforms

OPTIONS = {"color_jitter": 0.4, "grayscale": 1.0, "sharpness": 2.0, "noise": 0.1, "randaugment": (2, 15)}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_each_option_changes_training_images_and_never_validation_ones(option, name):
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    plain_train, _ = create_transforms(name, (40, 30), crop_fraction=(1, 1))
    train_tf, val_tf = create_transforms(name, (40, 30), crop_fraction=(1, 1), **{option: OPTIONS[option]})
    prepared = val_tf.prepare(image)
    assert torch.equal(val_tf(image), prepared)
    torch.manual_seed(1)
    without = [plain_train(image) for _ in range(6)]
    torch.manual_seed(1)
    with_option = [train_tf(image) for _ in range(6)]
    assert any(not torch.equal(a, b) for a, b in zip(with_option, without, strict=True))


def test_augmentation_flags_are_recorded_and_checked(tmp_path, tiny_data):
    flags = ["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path), "--model", "test_resnet",
             "--pretrained", "none",
             "--resize", "32", "24", "--num_workers", "0", "--epochs", "1"]
    train.main(flags + ["--color_jitter", "0.2", "--grayscale", "0.3", "--sharpness", "1", "--noise", "0.05",
                        "--randaugment", "2", "9"])
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert (config["color_jitter"], config["grayscale"], config["sharpness"], config["noise"], config["randaugment"]) \
        == (0.2, 0.3, 1.0, 0.05, [2, 9])
    for bad, flag in ((["--grayscale", "1.5"], "--grayscale"), (["--randaugment", "2", "40"], "--randaugment"),
                      (["--noise", "-1"], "--noise"), (["--color_jitter", "1"], "--color_jitter")):
        with pytest.raises(SystemExit, match=f"error: {flag}"):
            train.main(flags + bad)


def search_args(tmp_path, data, *own, fixed=()):
    """search.py's arguments: the space, its own flags, then fixed train.py flags of a tiny fast run."""
    return [str(tmp_path / "space.yaml"), *own, "--",
            "--data_dir", str(data / "train"), "--model_dir", str(tmp_path / "model"), "--model", "test_resnet",
                "--pretrained", "none",
            "--resize", "32", "24", "--num_workers", "0", "--epochs", "1", "--report", "off", *fixed]


def run_search(tmp_path, data, capsys, *own, fixed=()):
    """search.py in this process; returns what it printed."""
    capsys.readouterr()
    search.main(search_args(tmp_path, data, *own, fixed=fixed))
    return capsys.readouterr().out


def trial_folders(tmp_path):
    return sorted(p.name for p in (tmp_path / "model").iterdir() if p.is_dir())


def test_grid_runs_each_point_once_resumes_and_writes_results(tmp_path, tiny_data, capsys):
    (tmp_path / "space.yaml").write_text("lr: [0.003, 0.001]\nbatch_size: [16, 32]\n")
    printed = run_search(tmp_path, tiny_data, capsys, "--top", "2")
    assert trial_folders(tmp_path) == [f"space_t{i}" for i in range(4)]
    results = pd.read_csv(tmp_path / "model" / "space_results.csv")
    assert len(results) == 4 and set(zip(results["lr"], results["batch_size"], strict=True)) == {
        (0.003, 16), (0.003, 32), (0.001, 16), (0.001, 32)}
    assert results["f1"].is_monotonic_decreasing and (results["state"] == "complete").all()
    assert {"mask_acc", "gender_acc", "age_acc", "minutes", "run_dir"} <= set(results)
    assert (tmp_path / "model" / "space_results.md").read_text().startswith("| trial | lr | batch_size | f1 |")
    assert (tmp_path / "model" / "space_history.png").is_file()
    assert "python ensemble.py" in printed
    for run_dir in results["run_dir"]:
        assert (tmp_path / "model" / run_dir.split("/")[-1] / "best.pth").is_file()
    again = run_search(tmp_path, tiny_data, capsys)
    assert "\ntrial " not in "\n" + again and trial_folders(tmp_path) == [f"space_t{i}" for i in range(4)]


def test_a_killed_search_finishes_the_grid_when_run_again(tmp_path, tiny_data, capsys):
    (tmp_path / "space.yaml").write_text("lr: [0.003, 0.002, 0.001]\n")
    own = ["--grace_period", "3"]
    process = start_forked(search.main, search_args(tmp_path, tiny_data, *own, fixed=["--epochs", "3"]),
                           stdout=tmp_path / "stdout")
    started = 0
    for line in printed_lines(tmp_path / "stdout", process):
        started += line.startswith("trial ")
        if started == 2:  # the first trial is finished, the second is running (it printed its values)
            time.sleep(0.3)  # its first heartbeat is recorded
            process.kill()
            break
    process.join(timeout=60)
    assert process.exitcode == -signal.SIGKILL
    run_search(tmp_path, tiny_data, capsys, *own, fixed=["--epochs", "3"])
    results = pd.read_csv(tmp_path / "model" / "space_results.csv")
    complete = results[results["state"] == "complete"]
    assert sorted(complete["lr"]) == [0.001, 0.002, 0.003] and len(complete) == 3
    assert (results["state"] == "fail").sum() == 1  # the killed trial, retried as a new one


def test_two_processes_share_one_study_without_repeating_a_trial(tmp_path, tiny_data):
    (tmp_path / "space.yaml").write_text("lr: [0.003, 0.001]\nbatch_size: [16, 32]\n")
    outputs = [(tmp_path / f"stdout{i}", tmp_path / f"stderr{i}") for i in range(2)]
    processes = [start_forked(search.main, search_args(tmp_path, tiny_data), stdout=out, stderr=err)
                 for out, err in outputs]
    for process in processes:
        process.join(timeout=600)
    for _, err in outputs:  # shown in full where the assertion below fails (its message is cut)
        print(err.read_text()[-4000:])
    assert all(p.exitcode == 0 for p in processes), [err.read_text()[-1500:] for _, err in outputs]
    ran = [line for out, _ in outputs for line in out.read_text().splitlines() if line.startswith("trial ")]
    assert len(ran) == 4 and len(set(line.split(": ", 1)[1] for line in ran)) == 4
    results = pd.read_csv(tmp_path / "model" / "space_results.csv")
    assert len(results[results["state"] == "complete"]) == 4


def test_pruning_stops_a_trial_that_is_behind(tmp_path, tiny_data, capsys):
    (tmp_path / "space.yaml").write_text("lr: [0.003, 0.0]\n")
    run_search(tmp_path, tiny_data, capsys, "--prune", "--prune_startup", "1",
               fixed=["--epochs", "3", "--scheduler", "none", "--seed", "1"])
    results = pd.read_csv(tmp_path / "model" / "space_results.csv").set_index("lr")
    assert results.loc[0.003, "state"] == "complete" and results.loc[0.0, "state"] == "pruned"
    assert len(pd.read_csv(tmp_path / "model" / "space_t1" / "log.csv")) < 3


@pytest.mark.parametrize("space,own,message", [
    ("learning_rate: [0.1]\n", [], "unknown train.py flag 'learning_rate'"),
    ("model: [resnet18, no_such_model]\n", [], "model='no_such_model': --model: unknown timm model"),
    ("lr: [0.1]\ncriterion: [[nope]]\n", [], "criterion=['nope']"),
    ("", [], "the search space is empty"),
    ("lr: {low: 0.1}\n", [], "a range needs low and high"),
    ("lr: [1, 2\n  x: :\n", [], "space.yaml: not valid YAML"),
    ("\udce1\udcff", [], "space.yaml: not valid YAML"),
    ("lr: [0.1]\n", ["--storage", "sqlite:////no/such/folder/x.db"], "--storage: cannot open"),
])
def test_bad_spaces_and_storages_are_one_line_errors(tmp_path, tiny_data, capsys, space, own, message):
    (tmp_path / "space.yaml").write_bytes(space.encode("utf-8", "surrogateescape"))  # \udce1: the raw byte 0xe1
    with pytest.raises(SystemExit) as stop:
        search.main(search_args(tmp_path, tiny_data, *own))
    line = str(stop.value.code)
    assert "\n" not in line and line.startswith("error: ") and message in line
    assert capsys.readouterr().err == ""
    assert not (tmp_path / "model").exists() or not [p for p in (tmp_path / "model").iterdir() if p.is_dir()]


def test_a_search_needs_validation(tmp_path, tiny_data):
    (tmp_path / "space.yaml").write_text("lr: [0.1]\n")
    with pytest.raises(SystemExit, match="--val_ratio 0 leaves no validation to score the trials on"):
        search.main(search_args(tmp_path, tiny_data, fixed=("--val_ratio", "0")))


def test_a_crashing_trial_is_recorded_and_the_search_goes_on(tmp_path, tiny_data, monkeypatch):
    (tmp_path / "space.yaml").write_text("lr: [0.003, 0.001]\n")
    original = train.train_epoch

    def crash_for_small_lr(run, *args, **kwargs):
        if run.optimizer.param_groups[0]["lr"] < 0.002:
            raise RuntimeError("simulated crash")
        return original(run, *args, **kwargs)

    monkeypatch.setattr(train, "train_epoch", crash_for_small_lr)
    search.main(search_args(tmp_path, tiny_data, fixed=["--scheduler", "none"]))
    results = pd.read_csv(tmp_path / "model" / "space_results.csv").set_index("lr")
    assert results.loc[0.003, "state"] == "complete"
    assert results.loc[0.001, "state"] == "fail" and "simulated crash" in results.loc[0.001, "error"]


def fake_training(monkeypatch) -> list:
    """train.main replaced by a stub that trains nothing and scores 0.5: the argv of each trial, in order."""
    calls = []
    monkeypatch.setattr(train, "main", lambda argv, on_epoch=None: calls.append(argv) or [0.5])
    return calls


def refusal(tmp_path, data, *own, fixed=()) -> str:
    """The one line search.py stops with (nothing trained, nothing printed to stderr)."""
    with pytest.raises(SystemExit) as stop:
        search.main(search_args(tmp_path, data, *own, fixed=fixed))
    line = str(stop.value.code)
    assert "\n" not in line and line.startswith("error: ") and "pass --study NAME" in line
    return line


def test_a_study_refuses_other_fixed_flags(tmp_path, tiny_data, capsys, monkeypatch):
    calls = fake_training(monkeypatch)
    (tmp_path / "space.yaml").write_text("lr: [0.003, 0.001]\n")
    run_search(tmp_path, tiny_data, capsys)
    assert len(calls) == 2
    line = refusal(tmp_path, tiny_data, fixed=["--epochs", "5", "--model", "resnet18"])
    assert "--epochs 5 (study: 1)" in line and "--model resnet18 (study: test_resnet)" in line
    assert "study 'space'" in line and len(calls) == 2 and capsys.readouterr().err == ""
    assert "--prune on (study: off)" in refusal(tmp_path, tiny_data, "--prune")
    run_search(tmp_path, tiny_data, capsys, "--study", "longer", fixed=["--epochs", "5"])  # what the line says
    assert len(calls) == 4 and calls[-1][calls[-1].index("--name") + 1] == "longer_t1"


@pytest.mark.parametrize("space,message", [
    ("lr: [0.003, 0.002]\n", "space: lr values [0.003, 0.002] (study: [0.003, 0.001])"),
    ("lr: [0.003, 0.001]\nbatch_size: [16]\n", "space: batch_size added"),
    ("batch_size: [16, 32]\n", "space: batch_size added; space: lr removed"),
])
def test_a_study_refuses_another_space(tmp_path, tiny_data, capsys, monkeypatch, space, message):
    calls = fake_training(monkeypatch)
    (tmp_path / "space.yaml").write_text("lr: [0.003, 0.001]\n")
    run_search(tmp_path, tiny_data, capsys)
    (tmp_path / "space.yaml").write_text(space)
    assert message in refusal(tmp_path, tiny_data) and len(calls) == 2


def test_the_same_settings_resume_the_study(tmp_path, tiny_data, capsys, monkeypatch):
    calls = fake_training(monkeypatch)
    (tmp_path / "space.yaml").write_text("lr: {low: 0.0001, high: 0.01, log: true}\n")
    run_search(tmp_path, tiny_data, capsys, "--trials", "1")
    study = search.optuna.load_study(study_name="space", storage=f"sqlite:///{tmp_path / 'model' / 'space.db'}")
    assert study.user_attrs["fixed_flags"]["epochs"] == 1 and "model_dir" not in study.user_attrs["fixed_flags"]
    assert study.user_attrs["space"] == {"lr": {"low": 0.0001, "high": 0.01, "log": True}}
    # the same settings written differently, and flags that only say where logs go, resume the study
    (tmp_path / "space.yaml").write_text("lr:\n  log: true\n  low: 1.0e-4\n  high: 0.01\n")
    printed = run_search(tmp_path, tiny_data, capsys, "--trials", "3", fixed=["--lr", "1e-3", "--report", "on"])
    assert len(calls) == 3 and [line.split(":")[0] for line in printed.splitlines()[:2]] == ["trial 1", "trial 2"]
    assert [c[c.index("--name") + 1] for c in calls] == ["space_t0", "space_t1", "space_t2"]


def test_a_study_without_a_record_of_its_settings_is_refused(tmp_path, tiny_data, monkeypatch):
    calls = fake_training(monkeypatch)
    (tmp_path / "space.yaml").write_text("lr: [0.003, 0.001]\n")
    (tmp_path / "model").mkdir()
    old = search.optuna.create_study(study_name="space", storage=f"sqlite:///{tmp_path / 'model' / 'space.db'}")
    old.enqueue_trial({"lr": "0.003"}, user_attrs={"grid_point": True})  # as an older search.py left it
    old.set_user_attr("grid_size", 2)
    assert "has no record of the settings it was made with" in refusal(tmp_path, tiny_data) and not calls


def test_help_is_complete_and_flags_are_never_abbreviated(tmp_path, tiny_data):
    text = " ".join(search.build_parser().format_help().split())
    assert "a shared PostgreSQL URL lets several machines work on one study)." in text
    assert "(default: None)" not in text and "(default: 60)" in text
    assert "(default: the whole grid, or 20)" in text and text.count("(default:") == 7
    (tmp_path / "space.yaml").write_text("lr: [0.1]\n")
    with pytest.raises(SystemExit) as stop:
        search.main(search_args(tmp_path, tiny_data, "--tri", "3"))
    assert stop.value.code == 2 and not (tmp_path / "model").exists()


def claim_waiting_trials(url, out):
    """Ask an SQLite study (as search.py opens it) for its waiting trials until none is left; write the
    numbers handed to this process, one per line."""
    import optuna
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
    search.serialized_sqlite(storage)
    study = optuna.load_study(study_name="claims", storage=storage)
    claimed = []
    while study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        trial = study.ask()
        claimed.append(trial.number)
        study.tell(trial, 0.0)
    Path(out).write_text("".join(f"{n}\n" for n in claimed))


def test_processes_asking_one_sqlite_study_never_get_the_same_waiting_trial(tmp_path):
    """Without BEGIN IMMEDIATE, 4 processes asking for 120 waiting trials were handed 11 of them twice
    (2-core EPYC); search.py's grid points are such waiting trials."""
    import optuna
    url = f"sqlite:///{tmp_path / 'claims.db'}"
    study = optuna.create_study(study_name="claims", storage=url)
    for x in range(60):
        study.enqueue_trial({"x": x})
    outs = [tmp_path / f"claimed{i}" for i in range(3)]
    processes = [start_forked(claim_waiting_trials, url, str(out), stdout=tmp_path / f"stdout{i}")
                 for i, out in enumerate(outs)]
    for process in processes:
        process.join(timeout=300)
    assert all(p.exitcode == 0 for p in processes)
    claimed = [int(n) for out in outs for n in out.read_text().split()]
    waiting = {t.number for t in study.get_trials() if t.params.get("x") is not None}
    assert len(claimed) == len(set(claimed)) and waiting <= set(claimed)
