"""--amp auto and --channels_last auto: the resolution rules on every kind of machine (faked), and
what a run records."""
import json

import pytest
import torch

import inference
import precision
import train
from model import build_model
from precision import resolve_amp, resolve_channels_last


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Fake the CPU: native bf16 or not."""
    def fake(native):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    return fake


@pytest.mark.parametrize("capability,expected",
                         [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 0), "fp16"), ((7, 5), "fp16")])
def test_auto_on_cuda_is_bf16_from_ampere_else_fp16(monkeypatch, capability, expected):
    monkeypatch.setattr(precision, "cuda_capability", lambda device: capability)
    amp, reason = resolve_amp("auto", torch.device("cuda", 0))
    assert amp == expected and f"{capability[0]}.{capability[1]}" in reason
    assert ("grad scaler" in reason) == (expected == "fp16")


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "off")])
def test_auto_on_cpu_is_bf16_only_with_native_bf16(cpu_bf16, native, expected):
    cpu_bf16(native)
    amp, reason = resolve_amp("auto", "cpu")
    assert amp == expected
    assert reason.startswith("CPU with native bf16" if native else "CPU without native bf16")


def test_explicit_choices_stay_and_emulated_bf16_warns(cpu_bf16, capsys):
    cpu_bf16(False)
    for choice in ("off", "fp16", "bf16"):
        assert resolve_amp(choice, "cpu")[0] == choice
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: --amp bf16 on a CPU without native bf16" in err
    cpu_bf16(True)
    resolve_amp("bf16", "cpu")
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="--amp"):
        resolve_amp("fp8", "cpu")


def test_forced_avx2_kernels_are_not_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not precision.cpu_has_native_bf16()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not precision.cpu_has_native_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert precision.cpu_has_native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not precision.cpu_has_native_bf16()


@pytest.mark.parametrize("name,expected", [("test_resnet", True), ("test_efficientnet", True),
                                           ("test_convnext", True), ("test_vit", False)])
def test_channels_last_auto_is_on_for_convolutional_models(name, expected):
    net = build_model("three_head", name)
    assert resolve_channels_last("auto", net)[0] is expected
    assert resolve_channels_last("on", net)[0] is True and resolve_channels_last("off", net)[0] is False
    assert resolve_channels_last(True, net)[0] is True  # config.json of older runs: a bool


@pytest.mark.parametrize("faster", ["bf16", "off"])
def test_auto_on_a_native_bf16_cpu_takes_what_the_probe_measured_faster(cpu_bf16, faster):
    cpu_bf16(True)
    speeds = {"bf16": 30.0, "off": 20.0} if faster == "bf16" else {"bf16": 20.0, "off": 30.0}
    amp, reason = resolve_amp("auto", "cpu", probe=lambda: (faster, speeds))
    assert amp == faster and "measured on this model" in reason
    assert f"{'bf16' if faster == 'bf16' else 'fp32'} 30.0 img/s" in reason
    cpu_bf16(False)
    assert resolve_amp("auto", "cpu", probe=lambda: pytest.fail("no probe without native bf16"))[0] == "off"
    assert resolve_amp("off", "cpu", probe=lambda: pytest.fail("no probe for an explicit choice"))[0] == "off"


def test_bf16_is_picked_only_where_clearly_faster():
    """A near tie goes to fp32 (exact, and the tie is the probe's noise); a clear bf16 gain wins."""
    assert precision.faster_of({"bf16": 35.0, "off": 34.0}) == "off"
    assert precision.faster_of({"bf16": 30.0, "off": 59.0}) == "off"
    assert precision.faster_of({"bf16": 76.0, "off": 38.0}) == "bf16"
    assert precision.faster_of({"bf16": 1.1, "off": 1.0}) == "bf16"


@pytest.mark.parametrize("train_mode", [True, False])
def test_the_precision_probe_leaves_the_model_and_the_random_state_alone(train_mode):
    net = build_model("three_head", "test_resnet").eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(7)
    expected_draw = torch.rand(1)
    torch.manual_seed(7)
    choice, speeds = precision.faster_cpu_precision(net, (32, 24), batch_size=4, train=train_mode, channels_last=True)
    assert torch.equal(torch.rand(1), expected_draw)
    assert choice in ("bf16", "off") and set(speeds) == {"bf16", "off"} and min(speeds.values()) > 0
    assert choice == precision.faster_of(speeds)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # weights and BatchNorm statistics
    assert not net.training and all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("native,probed,expected", [(True, "bf16", "bf16"), (True, "off", "off"), (False, None, "off")])
def test_a_run_prints_and_records_asked_and_resolved(tmp_path, tiny_data, cpu_bf16, capsys, monkeypatch, native,
                                                     probed, expected):
    cpu_bf16(native)
    monkeypatch.setattr(precision, "faster_cpu_precision", lambda *a, **k: (probed, {"bf16": 2.0, "off": 1.0}))
    train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path), "--model", "test_resnet",
                "--pretrained", "none",
                "--resize", "32", "24", "--num_workers", "0", "--epochs", "1", "--cache_dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert f"amp auto -> {expected}: CPU with{'' if native else 'out'} native bf16" in out
    assert "channels_last auto -> on: convolutional model" in out
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert (config["amp"], config["amp_resolved"]) == ("auto", expected)
    assert (config["channels_last"], config["channels_last_resolved"]) == ("auto", True)
    monkeypatch.setattr(precision, "faster_cpu_precision", lambda *a, **k: (probed, {"bf16": 2.0, "off": 1.0}))
    paths = sorted((tiny_data / "eval" / "images").iterdir())[:2]
    options = inference.PredictOptions(batch_size=2, num_workers=0, cache_dir=tmp_path / "cache")
    probs = inference.Predictor(tmp_path / "exp", options).predict(paths)
    assert probs.shape == (2, 18)
    assert f"exp: amp auto -> {expected}: CPU with{'' if native else 'out'} native bf16" in capsys.readouterr().out


def test_bare_channels_last_flag_means_on():
    assert train.parse_args(["--channels_last"]).channels_last == "on"
    assert train.parse_args([]).channels_last == "auto" and train.parse_args([]).amp == "auto"


class _Miscompiled(torch.nn.Module):
    """What a miscompile looks like: the model's outputs, one of them NaN (inductor's AVX2 code did this)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, images):
        return {head: value * float("nan") for head, value in self.inner(images).items()}


def test_compile_falls_back_to_eager_where_the_compiled_output_is_wrong(monkeypatch):
    """checked_compile keeps the compiled model where it matches the eager one, returns the eager model and
    a reason where it does not, and leaves batch-norm statistics and the random state as they were."""
    torch.manual_seed(0)
    net = build_model("three_head", "test_resnet").eval()
    before = {name: buffer.clone() for name, buffer in net.named_buffers()}
    rng = torch.get_rng_state()
    monkeypatch.setattr(precision.torch, "compile", lambda module: module)  # "compiles" to itself: a match
    compiled, reason = precision.checked_compile(net, (4, 3, 32, 32), torch.device("cpu"))
    assert compiled is net and reason is None and not net.training
    monkeypatch.setattr(precision.torch, "compile", _Miscompiled)
    compiled, reason = precision.checked_compile(net, (4, 3, 32, 32), torch.device("cpu"), channels_last=True)
    assert compiled is net and "differs from the eager model's" in reason and "(4, 3, 32, 32)" in reason
    assert all(torch.equal(buffer, before[name]) for name, buffer in net.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng)


def test_train_compile_with_a_wrong_compiled_model_trains_eager_and_says_so(monkeypatch, tiny_data, tmp_path, capsys):
    monkeypatch.setattr(precision.torch, "compile", _Miscompiled)
    train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path), "--model", "test_resnet",
                "--pretrained", "none",
                "--resize", "32", "24", "--epochs", "1", "--num_workers", "0", "--report", "off", "--compile"])
    assert "warning: --compile: torch.compile's output differs from the eager model's" in capsys.readouterr().err
    assert (tmp_path / "exp" / "best.pth").is_file()
