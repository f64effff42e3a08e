"""Models: timm backbones with mask / gender / age heads (or one 18-class head), freezing,
pretrained weights, preprocessing config, and `probs18` for any model kind."""
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

HEADS = {"mask": 3, "gender": 2, "age": 3}
MODEL_KINDS = ("three_head", "single_head", "multi_backbone")


def create_backbone(name, pretrained=False, drop_path_rate=0.0) -> nn.Module:
    """A timm backbone without its classifier (outputs pooled features).

    `pretrained`: False; True for timm's usual weights (downloaded); or a local `.pth` /
    `.safetensors` file in timm's key format, loaded through timm (its classifier is dropped)."""
    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}: use a timm model name (see timm.list_models())")
    kwargs = dict(num_classes=0)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if pretrained in (False, None, "", "none", "false"):
        return timm.create_model(name, pretrained=False, **kwargs)
    if pretrained is True or pretrained in ("true", "timm"):
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as error:
            raise RuntimeError(f"could not get pretrained weights for {name} ({type(error).__name__}); without "
                               f"internet pass a local file: --pretrained PATH.safetensors (or .pth)") from None
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    except RuntimeError as error:
        raise RuntimeError(f"weights file {path} does not fit model {name}: {str(error).splitlines()[0]}") from None


class MaskModel(nn.Module):
    """Backbone(s) plus linear heads. `forward` always returns a dict of logits: `mask`, `gender`,
    `age` for the head kinds, or `class` (18) for the single head."""

    def __init__(self, backbones: dict, heads: dict, drop_rate=0.0):
        super().__init__()
        self.backbones = nn.ModuleDict(backbones)
        self.heads = nn.ModuleDict({
            head: nn.Sequential(nn.Dropout(drop_rate),
                                nn.Linear(self.backbones["shared" if "shared" in backbones else head].num_features, n))
            for head, n in heads.items()})

    def forward(self, images):
        if "shared" in self.backbones:
            features = self.backbones["shared"](images)
            return {head: layer(features) for head, layer in self.heads.items()}
        return {head: layer(self.backbones[head](images)) for head, layer in self.heads.items()}


def build_model(kind="three_head", model="resnet18", backbones=None, pretrained=False, drop_rate=0.0,
                drop_path_rate=0.0) -> MaskModel:
    """Build one of the three model kinds. `backbones` (multi_backbone only) maps each head to a
    timm name, e.g. {"mask": "convnext_tiny", "gender": "resnext50_32x4d", "age": "swin_s3_tiny_224"};
    heads it leaves out use `model`."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose from {', '.join(MODEL_KINDS)}")
    if kind == "single_head":
        return MaskModel({"shared": create_backbone(model, pretrained, drop_path_rate)}, {"class": 18}, drop_rate)
    if kind == "three_head":
        return MaskModel({"shared": create_backbone(model, pretrained, drop_path_rate)}, HEADS, drop_rate)
    names = {head: (backbones or {}).get(head) or model for head in HEADS}
    return MaskModel({head: create_backbone(name, pretrained, drop_path_rate) for head, name in names.items()},
                     HEADS, drop_rate)


def model_from_config(config: dict) -> MaskModel:
    """Rebuild a run's model (without weights) from its config.json."""
    return build_model(**config["model_args"])


def preprocessing(model: MaskModel) -> dict:
    """Input size, interpolation, mean and std from the (first) backbone's pretrained config."""
    config = timm.data.resolve_data_config({}, model=next(iter(model.backbones.values())))
    return dict(input_size=list(config["input_size"][1:]), interpolation=config["interpolation"],
                mean=list(config["mean"]), std=list(config["std"]))


def freeze(model: MaskModel, spec="none") -> tuple:
    """Freeze backbone parameters: "none", "all" (the heads train alone), or an integer N: every
    backbone trains only its last N parameter groups (timm's coarse group matcher: stem, stages or
    blocks, final norm). Returns (trainable, total) parameter counts."""
    spec = str(spec).lower()
    if spec not in ("none", "all") and not spec.isdigit():
        raise ValueError(f"--freeze must be none, all or a number of last stages to train, got {spec!r}")
    for param in model.parameters():
        param.requires_grad = True
    if spec != "none":
        for backbone in model.backbones.values():
            groups = timm.models.group_parameters(backbone, backbone.group_matcher(coarse=True))
            ordered = [groups[key] for key in sorted(groups)]
            frozen = ordered if spec == "all" else ordered[: max(len(ordered) - int(spec), 0)]
            params = dict(backbone.named_parameters())
            for names in frozen:
                for name in names:
                    params[name].requires_grad = False
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def probs18(outputs: dict) -> torch.Tensor:
    """18-class probabilities from any model kind's outputs: the softmax of the single head, or for
    three heads the product of their softmaxes (class = mask*6 + gender*3 + age)."""
    if "class" in outputs:
        return F.softmax(outputs["class"].float(), dim=1)
    return combine_heads(*(F.softmax(outputs[head].float(), dim=1) for head in HEADS))


def combine_heads(mask, gender, age):
    """18-class probabilities as the product of per-head ones (class = mask*6 + gender*3 + age);
    tensors or numpy arrays, any leading dimensions."""
    product = mask[..., :, None, None] * gender[..., None, :, None] * age[..., None, None, :]
    return product.reshape(*product.shape[:-3], 18)


def head_probs(probs) -> dict:
    """Per-head probabilities (mask 3, gender 2, age 3) as marginals of 18-class probabilities;
    tensors or numpy arrays, any leading dimensions."""
    grid = probs.reshape(*probs.shape[:-1], 3, 2, 3)
    return {"mask": grid.sum((-2, -1)), "gender": grid.sum((-3, -1)), "age": grid.sum((-3, -2))}


AMP_DTYPES = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device: torch.device, amp="off"):
    """Mixed precision for `amp` in off / fp16 / bf16, on CUDA or CPU."""
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp] or torch.float32, enabled=AMP_DTYPES[amp] is not None)


@torch.no_grad()
def predict(model, loader, amp="off", tta="none", progress=False):
    """Run `model` over a (prefetch) loader: returns (probabilities (N, 18) float32 on CPU, the
    loader's targets (N, ...)). `tta="hflip"` averages the plain and the flipped predictions."""
    if tta not in ("none", "hflip"):
        raise ValueError(f"--tta must be none or hflip, got {tta!r}")
    model.eval()
    device = next(model.parameters()).device
    probs, targets = [], []
    for images, target in tqdm(loader, desc="predict", disable=not progress, leave=False, dynamic_ncols=True):
        with autocast(device, amp):
            batch = probs18(model(images))
            if tta == "hflip":
                batch = (batch + probs18(model(images.flip(3)))) / 2
        probs.append(batch.float().cpu())
        targets.append(target.cpu())
    if not probs:
        return torch.zeros(0, 18), torch.zeros(0, dtype=torch.int64)
    return torch.cat(probs), torch.cat(targets)
