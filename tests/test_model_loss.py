import pytest
import timm
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from labels import HEADS, head_probs
from loss import F1Loss, create_criterion, create_multi_head_loss
from model import build_model, freeze, preprocessing, probs18

torch.manual_seed(0)


@pytest.mark.parametrize("gamma_name", ["focal", "label_smoothing"])
def test_reduces_to_cross_entropy(gamma_name):
    logits, target = torch.randn(16, 5), torch.randint(0, 5, (16,))
    weight = torch.rand(5) + 0.5
    criterion = create_criterion(gamma_name, 5, gamma=0.0, smoothing=0.0)
    assert torch.allclose(criterion(logits, target), F.cross_entropy(logits, target))
    weighted = create_criterion(gamma_name, 5, gamma=0.0, smoothing=0.0, class_weights=weight)
    assert torch.allclose(weighted(logits, target), F.cross_entropy(logits, target, weight=weight))


def test_focal_down_weights_easy_examples():
    logits, target = torch.tensor([[4.0, 0.0], [0.0, 0.5]]), torch.tensor([0, 0])
    assert create_criterion("focal", 2, gamma=2)(logits, target) < F.cross_entropy(logits, target)


def test_label_smoothing_uses_the_real_class_count():
    logits = torch.zeros(1, 18)
    logits[0, 0] = 50.0
    loss = create_criterion("label_smoothing", 18, smoothing=0.1)(logits, torch.tensor([0]))
    assert torch.allclose(loss, F.cross_entropy(logits, torch.tensor([0]), label_smoothing=0.1))
    assert loss > 0.1 * 17 / 18 * 40


def test_f1_loss_falls_as_predictions_improve_and_has_gradients():
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    losses = []
    for scale in (0.0, 1.0, 3.0, 10.0):
        logits = (F.one_hot(target, 3).float() * scale).requires_grad_()
        loss = F1Loss()(logits, target)
        loss.backward()
        assert logits.grad is not None and torch.isfinite(logits.grad).all()
        losses.append(loss.item())
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.01


@pytest.mark.parametrize("name", ["cross_entropy", "focal", "label_smoothing", "f1", "focal:0.6+f1:0.4"])
def test_every_loss_handles_a_batch_of_one(name):
    logits = torch.randn(1, 3, requires_grad=True)
    loss = create_criterion(name, 3)(logits, torch.tensor([2]))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_mix_is_the_weighted_sum():
    logits, target = torch.randn(8, 3), torch.randint(0, 3, (8,))
    mix = create_criterion("focal:0.6+f1:0.4", 3)(logits, target)
    expected = 0.6 * create_criterion("focal", 3)(logits, target) + 0.4 * create_criterion("f1", 3)(logits, target)
    assert torch.allclose(mix, expected)


def test_unknown_criterion_is_clear():
    with pytest.raises(ValueError, match="unknown criterion 'nope'"):
        create_criterion("nope", 3)
    with pytest.raises(ValueError, match="unknown heads"):
        create_multi_head_loss({"eyes": "focal"})


def test_multi_head_loss_weights_and_parts():
    outputs = {head: torch.randn(4, n) for head, n in HEADS.items()}
    targets = torch.tensor([[0, 1, 2], [1, 0, 0], [2, 1, 1], [0, 0, 0]])
    loss = create_multi_head_loss({"mask": "cross_entropy", "gender": "focal", "age": "focal"},
                                  head_weights={"age": 1.5})
    total, parts = loss(outputs, targets)
    assert set(parts) == set(HEADS)
    assert torch.allclose(parts["mask"], F.cross_entropy(outputs["mask"], targets[:, 0]))
    assert torch.allclose(total, parts["mask"] + parts["gender"] + 1.5 * parts["age"])
    classes = targets[:, 0] * 6 + targets[:, 1] * 3 + targets[:, 2]
    assert torch.allclose(loss(outputs, classes)[0], total)


@pytest.mark.parametrize("kind,backbones", [("three_head", None), ("single_head", None),
                                            ("multi_backbone", {"mask": "test_convnext", "gender": "test_resnet"})])
def test_each_model_kind_runs_forward_and_backward(kind, backbones):
    model = build_model(kind, "test_efficientnet", backbones=backbones, drop_rate=0.1)
    images = torch.randn(2, 3, 64, 48)
    outputs = model(images)
    assert set(outputs) == ({"class"} if kind == "single_head" else set(HEADS))
    heads = {"class": 18} if kind == "single_head" else HEADS
    loss, _ = create_multi_head_loss("focal", heads)(outputs, torch.tensor([3, 17]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    probs = probs18(outputs)
    assert probs.shape == (2, 18) and torch.allclose(probs.sum(1), torch.ones(2))


def test_probs18_agrees_with_the_heads():
    outputs = {head: torch.randn(32, n) for head, n in HEADS.items()}
    probs = probs18(outputs)
    assert torch.allclose(probs.sum(1), torch.ones(32))
    expected = outputs["mask"].argmax(1) * 6 + outputs["gender"].argmax(1) * 3 + outputs["age"].argmax(1)
    assert torch.equal(probs.argmax(1), expected)
    for head, p in head_probs(probs).items():
        assert torch.allclose(p, F.softmax(outputs[head], 1), atol=1e-6)


def test_vit_and_drop_path_build():
    model = build_model("three_head", "test_vit", drop_path_rate=0.1)
    assert model(torch.randn(1, 3, 160, 160))["age"].shape == (1, 3)
    assert preprocessing(model)["input_size"] == [160, 160]


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext", "test_efficientnet", "test_vit"])
def test_freezing_leaves_exactly_the_intended_parameters(name):
    model = build_model("three_head", name)
    heads = sum(p.numel() for p in model.heads.parameters())
    backbone = model.backbones["shared"]
    total = sum(p.numel() for p in model.parameters())
    assert freeze(model, "none") == (total, total)
    assert freeze(model, "all") == (heads, total)
    assert all(p.requires_grad for p in model.heads.parameters())
    trainable, _ = freeze(model, 2)
    groups = timm.models.group_parameters(backbone, backbone.group_matcher(coarse=True))
    last_two = [n for key in sorted(groups)[-2:] for n in groups[key]]
    params = dict(backbone.named_parameters())
    assert trainable == heads + sum(params[n].numel() for n in last_two)
    assert {n for n, p in params.items() if p.requires_grad} == set(last_two)
    with pytest.raises(ValueError, match="--freeze"):
        freeze(model, "half")
    with pytest.raises(ValueError, match=f"--freeze {len(groups)}: this backbone has {len(groups)} parameter groups, "
                                         "so nothing would be frozen"):
        freeze(model, len(groups))


def test_frozen_layers_batch_norms_still_learn_the_data_statistics():
    """--freeze stops gradients only: a frozen layer's batch norm still normalises by batch statistics
    in training and updates its running ones (on utkmask, keeping the ImageNet statistics instead cost
    0.010 macro F1 over four seeds and 0.017 for their vote, benchmarks/README.md)."""
    model = build_model("three_head", "test_efficientnet")
    freeze(model, 2)
    norms = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    frozen = [name for name, m in norms.items() if not m.weight.requires_grad]
    assert frozen
    before = {name: norms[name].running_mean.clone() for name in frozen}
    model.train()
    model(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert all(norms[name].training and not torch.equal(norms[name].running_mean, before[name]) for name in frozen)


@pytest.mark.parametrize("kind,name", [("three_head", "test_efficientnet"), ("single_head", "test_vit"),
                                       ("multi_backbone", "test_resnet")])
def test_layer_decay_scales_the_backbone_layers_below_the_heads(kind, name):
    import timm.optim
    model = build_model(kind, name)
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=0.01, layer_decay=0.5)
    scale_of = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    assert {scale_of[id(p)] for p in model.heads.parameters()} == {1.0}
    for backbone in model.backbones.values():
        layer_of = timm.models.group_parameters(backbone, backbone.group_matcher(), reverse=True)
        params = dict(backbone.named_parameters())
        n_layers = max(layer_of.values()) + 2  # the backbone's layers, then the heads
        assert n_layers >= 4
        for param_name, layer in layer_of.items():  # each layer at half the lr of the one above it
            assert scale_of[id(params[param_name])] == pytest.approx(0.5 ** (n_layers - 1 - layer))


def test_shared_pretrained_file_loads_the_same_weights(shared_weights):
    model = build_model("three_head", "efficientnet_lite0", pretrained=str(shared_weights))
    expected = load_file(shared_weights)
    state = model.backbones["shared"].state_dict()
    loaded = [k for k in expected if k in state]
    assert len(loaded) >= len(state) - 2
    assert all(torch.equal(state[k], expected[k]) for k in loaded)
    assert preprocessing(model)["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_pretrained_errors_are_clear(tmp_path, monkeypatch):
    """A missing file, an unknown name, and timm's weights where they cannot download (the hub offline, as
    HF_HUB_OFFLINE=1 makes it; set in-process, where huggingface_hub reads it at each download)."""
    import huggingface_hub.constants
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        build_model("three_head", "test_resnet", pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        build_model("three_head", "no_such_net")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match=r"could not get pretrained weights for test_resnet .*--pretrained PATH"):
        build_model("three_head", "test_resnet", pretrained=True)


def test_a_weights_file_of_another_model_is_an_error_not_a_partial_load(tmp_path):
    """timm loads a file with tensors to spare (efficientnet_lite1's into lite0) with only a warning."""
    from safetensors.torch import save_file
    weights = {k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=18).state_dict().items()}
    save_file(weights, tmp_path / "fits.safetensors")
    model = build_model("three_head", "test_resnet", pretrained=str(tmp_path / "fits.safetensors"))
    assert torch.equal(model.backbones["shared"].state_dict()["conv1.0.weight"], weights["conv1.0.weight"])
    save_file({**weights, "layer9.conv.weight": torch.zeros(1)}, tmp_path / "more.safetensors")
    with pytest.raises(RuntimeError, match=r"does not fit model test_resnet: 1 of its tensors have no place .*"
                                           r"layer9.conv.weight"):
        build_model("three_head", "test_resnet", pretrained=str(tmp_path / "more.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "conv1.0.weight"}, tmp_path / "less.safetensors")
    with pytest.raises(RuntimeError, match=r"0 of its tensors .* and 1 of the model's are not in it"):
        build_model("three_head", "test_resnet", pretrained=str(tmp_path / "less.safetensors"))
    (tmp_path / "damaged.safetensors").write_bytes((tmp_path / "fits.safetensors").read_bytes()[:100])
    with pytest.raises(RuntimeError, match=r"damaged.safetensors is not readable: SafetensorError"):
        build_model("three_head", "test_resnet", pretrained=str(tmp_path / "damaged.safetensors"))
    torch.save({"model": weights, "torch": torch.__version__}, tmp_path / "run.pth")  # pickles a TorchVersion
    with pytest.raises(RuntimeError, match=r"run.pth is not a plain state dict \(a train.py checkpoint\?"):
        build_model("three_head", "test_resnet", pretrained=str(tmp_path / "run.pth"))
