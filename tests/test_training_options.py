"""Random erasing, AutoAugment / TrivialAugmentWide and gradient clipping: recorded, range-checked,
training-only, and clipping bounds the gradient."""
import json

import pytest
import torch

import train
from augment import create_transforms
from dataset import PrefetchLoader


def test_the_options_are_recorded_and_validation_never_sees_them(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(runs), "--model", "test_resnet",
                "--pretrained", "none",
                "--resize", "32", "32", "--num_workers", "0", "--epochs", "1", "--report", "off",
                "--reprob", "0.5", "--remode", "const", "--recount", "2", "--auto_augment", "trivialaugment",
                "--clip_grad", "1.0", "--clip_mode", "agc"])
    config = json.loads((runs / "exp" / "config.json").read_text())
    assert (config["reprob"], config["remode"], config["recount"], config["auto_augment"], config["clip_grad"],
            config["clip_mode"]) == (0.5, "const", 2, "trivialaugment", 1.0, "agc")
    image = torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8)
    train_tf, val_tf = create_transforms("CustomAugmentation", (32, 32), auto_augment="autoaugment")
    plain = create_transforms("CustomAugmentation", (32, 32))[1]
    assert train_tf.auto_augment is not None and torch.equal(val_tf(image), plain(image))
    args = train.parse_args(["--data_dir", str(tiny_data / "train"), "--reprob", "1", "--num_workers", "0"])
    from dataset import DATASETS
    from model import build_model, preprocessing
    from spec import Preprocess
    dataset = DATASETS[args.dataset](table=train.scan_people(args.data_dir, check_images=False), val_ratio=0.2)
    model = build_model("three_head", "test_resnet")
    preprocess = Preprocess.from_flags(dict(vars(args), preprocessing=preprocessing(model)))
    loaders = train.make_loaders(args, preprocess, dataset, model, train.Placement(0, 1, torch.device("cpu")))
    train_loader, val_loader = loaders[0], loaders[2]
    assert isinstance(val_loader, PrefetchLoader) and val_loader.erase is None and train_loader.erase is not None


@pytest.mark.parametrize("flags, message", [
    (["--reprob", "1.5"], "--reprob must be a probability"),
    (["--recount", "0"], "--recount at least 1"),
    (["--clip_grad", "-1"], "--clip_grad must be positive"),
    (["--freeze", "2", "--cache_features", "--auto_augment", "autoaugment"], "drop --auto_augment"),
])
def test_bad_option_values_are_one_line_errors(tiny_data, tmp_path, flags, message):
    with pytest.raises(SystemExit) as error:
        train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(tmp_path), *flags])
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("mode", ["norm", "value"])
def test_clipping_bounds_the_gradient_of_a_huge_step(mode):
    net = torch.nn.Linear(8, 3)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e6)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    (net(torch.randn(4, 8)) * 1e6).sum().backward()
    train.clip_gradients(net, optimizer, scaler, 0.5, mode)
    grads = [p.grad for p in net.parameters()]
    if mode == "norm":
        assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= 0.5 + 1e-5
    else:
        assert max(g.abs().max() for g in grads) <= 0.5


def test_the_checkpoint_average_is_the_mean_of_the_kept_epochs(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    train.main(["--data_dir", str(tiny_data / "train"), "--model_dir", str(runs), "--model", "test_resnet",
                "--pretrained", "none",
                "--resize", "32", "32", "--num_workers", "0", "--epochs", "3", "--report", "off", "--val_ratio", "0",
                "--checkpoint_hist", "2"])
    run = runs / "exp"
    kept = sorted(run.glob("epoch*.pth"))
    assert [p.name for p in kept] == ["epoch2.pth", "epoch3.pth"]  # without validation: the last two
    states = [torch.load(p, weights_only=False)["model"] for p in kept]
    average = torch.load(run / "avg.pth", weights_only=False)
    assert average["averaged_epochs"] == [2, 3]
    for key, value in average["model"].items():
        if value.is_floating_point():
            assert torch.allclose(value, (states[0][key] + states[1][key]) / 2)
    out = tmp_path / "out"
    import inference
    inference.main(["--model_dir", str(run), "--data_dir", str(tiny_data / "eval"), "--output_dir", str(out),
                    "--num_workers", "0", "--checkpoint", "avg"])
    assert (out / "submission.csv").is_file()
