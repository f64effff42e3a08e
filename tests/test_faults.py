"""Bad data and broken runs: unreadable images are found before any run folder exists, errors are one
line, a killed or failing run never loses its checkpoints, and concurrent cache builds agree."""
import errno
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import ROOT, printed_lines, run_script, start_forked

import ensemble
import inference
import runs
import train
from augment import CustomAugmentation
from cache import DecodedCache, check_images
from dataset import ImageFiles, fast_collate, scan_people

FAST = ["--model", "test_resnet", "--pretrained", "none", "--resize", "32", "24", "--num_workers", "0",
        "--batch_size", "32", "--report", "off"]


def copy_data(tiny_data, tmp_path):
    shutil.copytree(tiny_data, tmp_path / "data")
    return tmp_path / "data"


def truncate(path):
    """Cut a JPEG short with its header intact: the cheap header check passes, decoding fails."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def train_main(data, tmp_path, *flags):
    return train.main(["--data_dir", str(data / "train"), "--model_dir", str(tmp_path / "runs"),
                       "--cache_dir", str(tmp_path / "cache"), *FAST, *flags])


@pytest.fixture
def broken_data(tiny_data, tmp_path):
    data = copy_data(tiny_data, tmp_path)
    people = sorted((data / "train" / "images").iterdir())
    bad = [people[0] / "mask1.jpg", people[3] / "normal.jpg"]
    for path in bad:
        truncate(path)
    return data, bad


@pytest.mark.parametrize("cache", [[], ["--cache"]])
def test_unreadable_train_images_stop_before_any_run_folder(broken_data, tmp_path, capsys, cache):
    data, bad = broken_data
    with pytest.raises(SystemExit) as stop:
        train_main(data, tmp_path, "--epochs", "1", *cache)
    message = str(stop.value.code)
    assert message.startswith("error: 2 unreadable image(s), all listed in") and "\n" not in message
    assert all(str(path) in message for path in bad) and "/__w/" not in message and ".cpp" not in message
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["bad_images.csv"]
    listed = pd.read_csv(tmp_path / "runs" / "bad_images.csv")
    assert sorted(listed["path"]) == sorted(map(str, bad)) and listed["reason"].str.len().gt(0).all()


def test_skip_bad_images_trains_without_them_and_names_them(broken_data, tmp_path, capsys):
    data, bad = broken_data
    train_main(data, tmp_path, "--epochs", "1", "--skip_bad_images")
    assert "leaving out 2 unreadable image(s)" in capsys.readouterr().err
    run_dir = tmp_path / "runs" / "exp"
    assert sorted(pd.read_csv(run_dir / "skipped_images.csv")["path"]) == sorted(map(str, bad))
    assert pd.read_json(run_dir / "config.json", typ="series")["skipped_images"] == 2
    assert (run_dir / "best.pth").is_file()


def test_the_check_is_remembered_for_unchanged_files(tiny_data, tmp_path, monkeypatch):
    import dataset
    paths = list(scan_people(tiny_data / "train")["path"])
    assert check_images(paths, tmp_path) == []
    decoded = []
    original = dataset.load_image
    monkeypatch.setattr(dataset, "load_image",
                        lambda path, transform=None, region=None: decoded.append(path) or original(path))
    assert check_images(paths, tmp_path) == [] and decoded == []
    monkeypatch.chdir(tiny_data)  # the same files by relative paths: still remembered
    assert check_images([os.path.relpath(p, tiny_data) for p in paths], tmp_path) == [] and decoded == []
    monkeypatch.chdir(tmp_path)
    stat = os.stat(paths[2])
    os.utime(paths[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert check_images(paths, tmp_path) == [] and decoded == [paths[2]]


def test_the_cache_build_counts_as_the_check(tiny_data, tmp_path, monkeypatch):
    import dataset
    paths = list(scan_people(tiny_data / "train")["path"])
    DecodedCache.build(paths, CustomAugmentation((32, 24), train=False), tmp_path)
    monkeypatch.setattr(dataset, "load_image", lambda *args: pytest.fail("decoded again"))
    assert check_images(paths, tmp_path) == []


def test_unreadable_eval_image_stops_inference_with_one_line(tiny_data, tmp_path):
    data = copy_data(tiny_data, tmp_path)
    train_main(data, tmp_path, "--epochs", "1")
    image = sorted((data / "eval" / "images").iterdir())[4]
    truncate(image)
    process = start_forked(run_script, ROOT / "inference.py", "--model_dir", tmp_path / "runs", "--data_dir",
                           data / "eval", "--output_dir", tmp_path / "out", "--num_workers", 1,
                           stdout=tmp_path / "stdout", stderr=tmp_path / "stderr")
    process.join(timeout=300)
    stderr = (tmp_path / "stderr").read_text()
    assert process.exitcode != 0
    messages = [line for line in re.split(r"[\r\n]", stderr) if line.strip() and "images:" not in line]
    assert len(messages) == 1 and messages[0].startswith("error: 1 unreadable image(s)"), stderr
    assert image.name in messages[0] and "Traceback" not in stderr and "/__w/" not in stderr
    assert "--bad_images fill" in messages[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bad_images.csv"]
    # --bad_images fill: every row is written, the unreadable image gets the mean of the others
    flags = ["--data_dir", str(data / "eval"), "--output_dir", str(tmp_path / "filled"), "--num_workers", "0",
             "--bad_images", "fill"]
    inference.main(["--model_dir", str(tmp_path / "runs"), *flags])
    info = pd.read_csv(data / "eval" / "info.csv")
    submission = pd.read_csv(tmp_path / "filled" / "submission.csv")
    assert submission["ImageID"].tolist() == info["ImageID"].tolist() and submission["ans"].between(0, 17).all()
    probs = runs.read_probabilities(tmp_path / "filled" / "submission_probs.csv").set_index("ImageID")[
        runs.PROB_COLUMNS]
    others = probs.drop(index=image.name)
    assert probs.loc[image.name].to_numpy() == pytest.approx(others.mean().to_numpy(), abs=1e-5)
    assert pd.read_csv(tmp_path / "filled" / "bad_images.csv")["path"].tolist() == [str(image)]
    run_dir = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    ensemble.main([str(run_dir), str(tmp_path / "filled" / "submission_probs.csv"), *flags])
    assert pd.read_csv(tmp_path / "filled" / "ensemble.csv")["ImageID"].tolist() == info["ImageID"].tolist()


def test_an_error_inside_a_loader_worker_is_one_clean_line(broken_data):
    _, bad = broken_data
    loader = torch.utils.data.DataLoader(ImageFiles([bad[0]]), num_workers=1, collate_fn=fast_collate)
    with pytest.raises(ValueError) as raised:
        next(iter(loader))
    assert "Traceback" in str(raised.value)
    line = runs.one_line(raised.value)
    assert line.startswith(f"unreadable image {bad[0]}: ") and "\n" not in line
    assert "/__w/" not in line and ".cpp" not in line


def test_a_failed_run_leaves_no_run_folder_and_inference_skips_half_made_ones(tiny_data, tmp_path, monkeypatch):
    train_main(tiny_data, tmp_path, "--epochs", "1", "--name", "good")
    monkeypatch.setattr(train, "train_epoch", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(SystemExit, match="error: boom"):
        train_main(tiny_data, tmp_path, "--epochs", "1", "--name", "bad")
    assert not (tmp_path / "runs" / "bad").exists()
    half = tmp_path / "runs" / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert inference.newest_run(tmp_path / "runs") == tmp_path / "runs" / "good"


def test_a_damaged_run_file_is_one_line_that_names_it(tiny_data, tmp_path):
    train_main(tiny_data, tmp_path, "--epochs", "1", "--name", "good")
    run_dir = tmp_path / "runs" / "good"
    common = ["--data_dir", str(tiny_data / "eval"), "--output_dir", str(tmp_path / "out"), "--num_workers", "0"]
    checkpoint, config = (run_dir / "best.pth").read_bytes(), (run_dir / "config.json").read_text()
    for damaged in (checkpoint[:1000], b""):
        (run_dir / "best.pth").write_bytes(damaged)
        with pytest.raises(SystemExit, match=r"best.pth is damaged or not a train.py checkpoint \(\w"):
            inference.main(["--model_dir", str(run_dir), *common])
    (run_dir / "best.pth").write_bytes(checkpoint)
    (run_dir / "config.json").write_text(config[: len(config) // 2])
    with pytest.raises(SystemExit, match=r"config.json is damaged or not JSON"):
        inference.main(["--model_dir", str(run_dir), *common])
    (tmp_path / "x_cv.json").write_text('{"fold": []}')
    with pytest.raises(SystemExit, match=r"x_cv.json: not a train.py <name>_cv.json"):
        ensemble.main([str(tmp_path / "x_cv.json"), *common])


def test_a_failing_write_keeps_the_previous_checkpoints(tiny_data, tmp_path, monkeypatch):
    saves = []
    original = torch.save

    def disk_full(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) > 3:  # last.pth at start, then best and last of epoch 1; epoch 2 cannot write
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as stop:
        train_main(tiny_data, tmp_path, "--epochs", "3", "--lr", "3e-3")
    message = str(stop.value.code)
    assert "\n" not in message and "could not write" in message and "No space left on device" in message
    run_dir = tmp_path / "runs" / "exp"
    assert torch.load(run_dir / "last.pth", weights_only=False)["epoch"] == 1
    assert torch.load(run_dir / "best.pth", weights_only=False)["epoch"] == 1
    assert not list(run_dir.glob(".*.tmp"))


def train_dying_in_the_third_save(argv):
    """train.main(argv) killed half-way through its second checkpoint write of epoch 1."""
    original, calls = torch.save, []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            open(path, "wb").write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(obj, path, *args, **kwargs)

    torch.save = save
    train.main(argv)


@pytest.mark.parametrize("seed", [0, 1, 2, "during_save"])
def test_sigkill_at_any_moment_leaves_a_resumable_run(tiny_data, tmp_path, seed):
    flags = ["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path / "runs"), "--cache_dir",
             str(tmp_path / "cache"), *FAST, "--epochs", "4"]
    target = train_dying_in_the_third_save if seed == "during_save" else train.main
    process = start_forked(target, flags, stdout=tmp_path / "stdout")
    for line in printed_lines(tmp_path / "stdout", process):  # the run header: config.json and a first last.pth
        if line.startswith("amp "):                             # exist from here on
            break
    if seed != "during_save":
        time.sleep(random.Random(seed).uniform(0, 1.5))
        process.kill()
    process.join(timeout=120)
    assert process.exitcode == -signal.SIGKILL or seed != "during_save"  # a late kill may find the run finished
    run_dir = tmp_path / "runs" / "exp"
    train.main(["--resume", str(run_dir), "--num_workers", "0"])
    last = torch.load(run_dir / "last.pth", weights_only=False)
    assert last["epoch"] == 4 and len(pd.read_csv(run_dir / "log.csv")) == 4
    assert torch.load(run_dir / "best.pth", weights_only=False)["f1"] == pytest.approx(last["best_f1"])
    assert not list(run_dir.glob(".*.tmp"))


def build_cache(paths, cache_dir):
    print(DecodedCache.build(paths, CustomAugmentation((48, 32), train=False), cache_dir).data_path)


def test_two_processes_building_one_cache_at_once(tiny_data, tmp_path):
    paths = list(scan_people(tiny_data / "train")["path"])
    processes = [start_forked(build_cache, paths, tmp_path / "cache", stdout=tmp_path / f"stdout{i}")
                 for i in range(2)]
    for process in processes:
        process.join(timeout=300)
    outputs = [(tmp_path / f"stdout{i}").read_text().strip() for i in range(2)]
    assert all(p.exitcode == 0 for p in processes) and outputs[0] == outputs[1]
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 1 and not list((tmp_path / "cache").glob(".*.tmp"))
    transform = CustomAugmentation((48, 32), train=False)
    fresh = DecodedCache.build(paths, transform, tmp_path / "fresh")
    assert Path(outputs[0]).read_bytes() == Path(fresh.data_path).read_bytes()
