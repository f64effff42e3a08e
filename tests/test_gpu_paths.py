"""The GPU paths' mechanisms on a CPU (issue 52): the device check with a card this torch cannot run (its
capability patched), bf16 on a GPU without it, a CPU run's scaler state resumed under fp16, and DDP with
two gloo processes: per-rank seeds, all-reduce only on the update's micro-batch, compile after DDP,
batch-norm statistics averaged, the drop_last arithmetic."""
import json
import os
import socket

import pytest
import torch

from conftest import FORKSERVER

import precision
import train

FAST = ["--resize", "32", "24", "--num_workers", "0", "--batch_size", "8", "--model", "test_resnet",
        "--pretrained", "none", "--report", "off", "--epochs", "1", "--amp", "off"]


@pytest.fixture
def a_v100_with_a_cuda13_build(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"])


def test_a_gpu_this_torch_cannot_run_is_one_line_before_any_work(a_v100_with_a_cuda13_build, tmp_path, tiny_data):
    with pytest.raises(precision.DeviceError) as error:
        precision.select_device("auto")
    message = str(error.value)
    assert "Tesla V100-SXM2-32GB (compute capability 7.0, sm_70)" in message and "CUDA 13.0" in message
    assert "CUDA 12.x build" in message and "--device cpu" in message
    assert precision.select_device("cpu") == torch.device("cpu")
    with pytest.raises(SystemExit) as stop:
        train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path / "model"), *FAST])
    assert "sm_70" in str(stop.value.code) and "\n" not in str(stop.value.code)
    assert not (tmp_path / "model").exists()


def test_a_card_the_build_has_kernels_or_ptx_for_is_used(a_v100_with_a_cuda13_build, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_70", "sm_80", "sm_90"])
    assert precision.select_device("auto") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_60", "compute_60"])
    assert precision.cuda_problem() is None  # PTX compiles for a newer card
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (8, 9))  # an L4: sm_86's kernels run
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"])
    assert precision.cuda_problem() is None


def test_device_cuda_without_a_usable_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "gpu_present", lambda: False)
    with pytest.raises(precision.DeviceError, match="--device cuda: this machine has no GPU"):
        precision.select_device("cuda")
    assert precision.select_device("auto") == torch.device("cpu")
    monkeypatch.setattr(precision, "gpu_present", lambda: True)  # a GPU the driver or build cannot start
    with pytest.raises(precision.DeviceError, match="--device auto: .*driver"):
        precision.select_device("auto")
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a GPU hidden on purpose: the CPU, no error
    assert not precision.gpu_present() and precision.select_device("auto") == torch.device("cpu")


def test_bf16_on_a_gpu_without_it_becomes_fp16_with_a_line(monkeypatch, capsys):
    monkeypatch.setattr(precision, "cuda_capability", lambda device: (7, 0))
    amp, line = precision.resolve_amp("bf16", torch.device("cuda"))
    assert amp == "fp16" and "7.0 has no native bf16" in line
    assert "warning: --amp bf16" in capsys.readouterr().err
    monkeypatch.setattr(precision, "cuda_capability", lambda device: (8, 0))
    assert precision.resolve_amp("bf16", torch.device("cuda"))[0] == "bf16"


def test_a_cpu_runs_disabled_scaler_state_resumes_under_fp16():
    saved = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert saved == {}
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    train.restore_scaler(scaler, saved)  # loading {} into an enabled scaler raises in torch
    assert scaler.get_scale() == 65536.0
    trained = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    train.restore_scaler(scaler, trained.state_dict())
    assert scaler.get_scale() == 1024.0


def ddp_rank(rank, port, out, argv):
    """One torchrun-like process of a two-process gloo run of train.py, recording what the issue's fixes
    change: the seeds, the all-reduces, what is compiled, the batch-norm statistics after averaging."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    record = dict(seeds=[], reduces=0, compiled=[], bn=None)

    def seed(value):
        record["seeds"].append(value)
        return original_seed(value)

    def compile_(module, **kwargs):
        record["compiled"].append(type(module).__name__)
        return module

    def hook(state, bucket):
        record["reduces"] += bucket.is_last()  # one count per backward pass that all-reduces
        return torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

    class CountingDDP(train.DistributedDataParallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_comm_hook(None, hook)

    def averaged_bn(model, world, reduce=False):
        original_bn(model, world, reduce)
        record["bn"] = next(m.running_mean.tolist() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))

    original_seed, original_bn = train.seed_everything, train.distribute_bn
    train.seed_everything, train.DistributedDataParallel, train.distribute_bn = seed, CountingDDP, averaged_bn
    torch.compile = compile_
    train.main(argv)
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def test_ddp_on_two_gloo_processes(tmp_path, tiny_data):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path / "model"), *FAST, "--grad_accum", "2",
            "--compile", "--val_ratio", "0.2"]
    processes = [FORKSERVER.Process(target=ddp_rank, args=(rank, port, tmp_path, argv)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(300)
    assert [p.exitcode for p in processes] == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["seeds"][-1] != ranks[1]["seeds"][-1]  # each rank its own augmentation
    batches = 63 // 8  # 126 training images: 63 a rank, in batches of 8, the partial last one dropped (--compile)
    assert ranks[0]["reduces"] == ranks[1]["reduces"] == -(-batches // 2)  # one all-reduce per update, not per batch
    assert ranks[0]["compiled"][-1] == "CountingDDP"  # the DDP-wrapped model is compiled, not wrapped compiled
    assert ranks[0]["bn"] == pytest.approx(ranks[1]["bn"])


@pytest.mark.parametrize("n, world, batch, compiled, dropped", [(129, 1, 64, False, True), (129, 2, 64, False, True),
                                                                (131, 2, 65, False, True), (130, 2, 64, True, True),
                                                                (128, 2, 64, True, False),
                                                                (130, 1, 64, False, False)])
def test_drop_last_follows_the_distributed_samplers_share(n, world, batch, compiled, dropped):
    """DistributedSampler gives each rank ceil(n / world) images: a last batch of 1 (batch norm) is dropped,
    and under --compile any partial last batch (a recompile)."""
    assert train.drop_last_batch(n, world, batch, compiled) == dropped
