"""The same command gives the same model: two runs of one short command (same seed, same machine) write
bit-identical weights and the same losses, with --amp off and with auto (whose CPU timing is kept in the
cache folder and repeated); another seed gives another model."""
import json

import pandas as pd
import pytest
import torch

import model
import precision
import train


def run(tiny_data, tmp_path, name, *flags):
    train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path / "runs"), "--name", name,
                "--model", "test_resnet", "--pretrained", "none", "--resize", "32", "32", "--num_workers", "0",
                    "--epochs", "2",
                "--batch_size", "32", "--report", "off", "--cache_dir", str(tmp_path / "cache"), *flags])
    folder = tmp_path / "runs" / name
    weights = torch.load(folder / "best.pth", map_location="cpu", weights_only=False)["model"]
    return weights, pd.read_csv(folder / "log.csv"), json.loads((folder / "config.json").read_text())


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flags", [["--amp", "off"], ["--amp", "auto", "--grayscale", "0.5", "--num_workers", "2"]])
def test_the_same_command_writes_the_same_model(tiny_data, tmp_path, flags):
    first, log1, config1 = run(tiny_data, tmp_path, "a", *flags)
    second, log2, config2 = run(tiny_data, tmp_path, "b", *flags)
    assert config1["amp_resolved"] == config2["amp_resolved"] and config1["deterministic_resolved"]
    assert same(first, second)
    assert log1["train_loss"].tolist() == log2["train_loss"].tolist()
    other, log3, _ = run(tiny_data, tmp_path, "c", *flags, "--seed", "7")
    assert not same(first, other) and log1["train_loss"].tolist() != log3["train_loss"].tolist()


def test_auto_times_once_per_machine_and_workload(tmp_path, monkeypatch):
    """--amp auto on a CPU with native bf16 times the model once; later runs with the same key repeat the
    choice (and say when it was timed); another input size times again."""
    calls = []
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "faster_cpu_precision",
                        lambda *a, **k: calls.append(1) or ("off", {"off": 10.0, "bf16": 10.5}))
    net = model.build_model("three_head", "test_resnet")
    record = tmp_path / precision.AMP_TIMINGS
    cpu = torch.device("cpu")
    first = precision.resolve_precision(net, "auto", "auto", cpu, (32, 32), 16, remember=record)
    again = precision.resolve_precision(net, "auto", "auto", cpu, (32, 32), 16, remember=record)
    assert len(calls) == 1 and first[0] == again[0] == "off" and "as timed on" in again[2]
    precision.resolve_precision(net, "auto", "auto", cpu, (48, 48), 16, remember=record)
    assert len(calls) == 2
