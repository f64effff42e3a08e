"""Models: timm backbones with mask / gender / age heads (or one 18-class head), freezing,
pretrained weights, preprocessing config, and `probs18` for any model kind."""
import os
import socket
import urllib.parse
from pathlib import Path

import timm
import torch
from timm.models import group_parameters
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from labels import HEADS, combine_heads
from precision import autocast

YEARS_CENTRE, YEARS_SCALE = 40.0, 20.0  # the years head outputs (age - centre) / scale, so it starts near 40
MODEL_KINDS = ("three_head", "single_head", "multi_backbone")


MODEL_SOURCES = ("local-dir", "hf-hub")


def is_source(name) -> bool:
    """Whether `name` is a timm model source (`local-dir:FOLDER`, `hf-hub:ORG/NAME`), not a registry name."""
    return str(name).split(":", 1)[0].lower() in MODEL_SOURCES and ":" in str(name)


def resolve_source(name) -> dict:
    """What rebuilds a model source without it: {"architecture", "model_args", "pretrained_cfg"} from its
    `config.json` (timm's own reader: a local folder, or the hub, which downloads). One-line errors name
    the folder or the hub id."""
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path
    source, _, where = str(name).partition(":")
    if source.lower() == "local-dir":
        folder = Path(where)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder not found: {folder} (from {name})")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"model folder {folder} has no config.json (timm's local-dir layout: config.json "
                                    "+ model.safetensors)")
        try:
            cfg, architecture, model_args = load_model_config_from_path(folder)
        except Exception as error:
            raise ValueError(f"model folder {folder}: config.json is not readable ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from None
    else:
        try:
            cfg, architecture, model_args = load_model_config_from_hf(where)
        except Exception as error:
            raise RuntimeError(f"{name}: could not download its config.json ({type(error).__name__}); without "
                               "internet, download the model folder elsewhere and use local-dir:FOLDER") from None
    if not timm.is_model(architecture):
        where_from = f"model folder {where}" if source.lower() == "local-dir" else name
        raise ValueError(f"{where_from}: unknown architecture {architecture!r} in its config.json")
    cfg = {key: value for key, value in cfg.items() if key != "file"}
    return dict(architecture=architecture, model_args=dict(model_args or {}), pretrained_cfg=cfg)


def check_model_name(name) -> dict:
    """A timm registry name (returns None) or a source (returns `resolve_source`'s record); raises
    ValueError / FileNotFoundError / RuntimeError with one line otherwise."""
    if is_source(name):
        return resolve_source(name)
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r} (see timm.list_models()); a model source is "
                         "local-dir:FOLDER or hf-hub:ORG/NAME")
    return None


def create_backbone(name, pretrained=False, drop_path_rate=0.0, source=None, img_size=None) -> nn.Module:
    """A timm backbone without its classifier (outputs pooled features).

    `name`: a timm name or a model source (`local-dir:FOLDER`, `hf-hub:ORG/NAME`). `pretrained`: "auto"
    or True for the usual weights (timm's, downloaded once into its cache, for a name; the source's own
    for a source); False for random weights; or a local `.pth` / `.safetensors` file in timm's key format
    (its classifier is dropped). `source`: the source's record (`resolve_source`), which rebuilds its
    architecture and preprocessing without the folder or the hub (weights then come from a checkpoint).
    `img_size` (H, W): the input size for models built for one size (ViTs: timm resamples their position
    embeddings); models that take any size ignore it."""
    pretrained = True if pretrained in ("auto", "true", "timm") else pretrained
    kwargs = dict(num_classes=0)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if img_size:
        kwargs["img_size"] = tuple(img_size)
    if is_source(name):
        source = source or resolve_source(name)
        if pretrained is True:
            return load_source_weights(name, source, kwargs)
        backbone = sized_model(source["architecture"], kwargs, pretrained=False,
                               pretrained_cfg=source["pretrained_cfg"], **source["model_args"])
        if pretrained in (False, None, "", "none", "false"):
            return backbone
        return load_weights_file(backbone, pretrained, name)
    check_model_name(name)
    if pretrained in (False, None, "", "none", "false"):
        return sized_model(name, kwargs, pretrained=False)
    if pretrained is True:
        try:
            return sized_model(name, kwargs, pretrained=True)
        except Exception as error:
            raise RuntimeError(f"could not get pretrained weights for {name} ({type(error).__name__}); without "
                               "internet pass a local file (--pretrained PATH.safetensors or .pth) or train from "
                               "random weights with --pretrained none") from None
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    try:
        backbone = sized_model(name, kwargs, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    except RuntimeError as error:
        if "weights_only" in str(error):  # a pickled object, not a plain state dict
            raise RuntimeError(f"weights file {path} is not a plain state dict (a train.py checkpoint? --resume "
                               "RUN_DIR continues a run; --pretrained takes a timm backbone's weights)") from None
        raise RuntimeError(f"weights file {path} does not fit model {name}: {str(error).splitlines()[0]}") from None
    except Exception as error:  # safetensors' own error for a damaged file is no RuntimeError
        raise RuntimeError(f"weights file {path} is not readable: {type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else 'no detail'}") from None
    check_weights_fit(path, backbone, name)
    return backbone


def sized_model(name, kwargs, **more) -> nn.Module:
    """`timm.create_model(name, **more, **kwargs)`; where the architecture takes no `img_size` (CNNs take
    any size), without it. A source's own `model_args` img_size gives way to the run's."""
    if "img_size" in kwargs:
        more.pop("img_size", None)
        try:
            return timm.create_model(name, **more, **kwargs)
        except TypeError as error:
            if "img_size" not in str(error):
                raise
            kwargs = {key: value for key, value in kwargs.items() if key != "img_size"}
    return timm.create_model(name, **more, **kwargs)


def timm_weights(name) -> tuple:
    """(where, location) timm loads `name`'s pretrained weights from: ("hf-hub", "timm/resnet18.a1_in1k"),
    ("url", URL) or ("", "") where timm has none for that name."""
    from timm.models._builder import _resolve_pretrained_source
    from timm.models._registry import get_pretrained_cfg
    cfg = get_pretrained_cfg(name, allow_unregistered=False)
    if cfg is None:
        return "", ""
    where, location = _resolve_pretrained_source(cfg.to_dict())
    return where, location[0] if isinstance(location, tuple) else location


def fetch_pretrained(name, timeout=5.0) -> str:
    """Make sure timm's pretrained weights of the registry name `name` are in timm's local cache before
    any work (downloaded once, by timm itself); return where they come from, e.g.
    "timm/resnet18.a1_in1k". Where they cannot be had (timm has none for the name, HF_HUB_OFFLINE, no
    connection) a one-line RuntimeError says so and names --pretrained none."""
    where, location = timm_weights(name)
    random_init = "or train from random weights with --pretrained none"
    if not where:
        raise RuntimeError(f"timm has no pretrained weights for {name}: pass a weights file with --pretrained FILE, "
                           f"{random_init}")
    host = "huggingface.co" if where == "hf-hub" else urllib.parse.urlparse(location).hostname
    hub_offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") and where == "hf-hub"
    offline = hub_offline
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if not offline and not proxied:  # behind a proxy only the download itself can tell
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
        except OSError:
            offline = True
    if is_cached(where, location):
        if offline and where == "hf-hub":  # load from the cache at once, not after the hub's retries (~80 s)
            import huggingface_hub.constants
            huggingface_hub.constants.HF_HUB_OFFLINE = True
        return location
    if hub_offline:
        raise RuntimeError(f"{name}'s pretrained weights ({location}) are not in the local cache and HF_HUB_OFFLINE "
                           f"is set: download them once online, pass a file with --pretrained FILE, {random_init}")
    if offline:
        raise RuntimeError(f"{name}'s pretrained weights ({location}) are not in the local cache and {host} cannot be "
                           f"reached (offline?): pass a file with --pretrained FILE, {random_init}") from None
    create_backbone(name, True)  # timm downloads them into its cache
    return location


def is_cached(where, location) -> bool:
    """Whether timm's weights at `location` are already in the local cache (the hub's or torch hub's)."""
    if where == "hf-hub":
        from huggingface_hub import try_to_load_from_cache
        return any(isinstance(try_to_load_from_cache(location, f), str)
                   for f in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"))
    if where == "url":
        filename = Path(urllib.parse.urlparse(location).path).name
        return (Path(torch.hub.get_dir()) / "checkpoints" / filename).is_file()
    return where in ("file", "state_dict", "local-dir")


def weights_line(name, pretrained) -> str:
    """Where a backbone's starting weights come from, for the run header: "random init", "file PATH",
    "timm's pretrained timm/resnet18.a1_in1k" or "the source's own (local-dir:FOLDER)"."""
    if pretrained in (False, None, "", "none", "false"):
        return "random init (--pretrained none)"
    if pretrained not in (True, "auto", "true", "timm"):
        return f"file {pretrained}"
    if is_source(name):
        return f"its own weights ({name})"
    return f"timm's pretrained {timm_weights(name)[1]}"


def load_source_weights(name, source, kwargs) -> nn.Module:
    """A model source built with its own weights through timm, checked to fit exactly."""
    try:
        backbone = sized_model(name, kwargs, pretrained=True)
    except Exception as error:
        where = f"model folder {name.split(':', 1)[1]}" if name.lower().startswith("local-dir") else name
        raise RuntimeError(f"{where}: its weights do not load into {source['architecture']} ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from None
    if name.lower().startswith("local-dir"):
        folder = Path(name.split(":", 1)[1])
        files = [folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()]
        if files:
            check_weights_fit(files[0], backbone, name)
    return backbone


def load_weights_file(backbone, path, name) -> nn.Module:
    """`backbone` with the weights of a local file in timm's key format (classifier dropped), checked to fit."""
    from timm.models import load_state_dict
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    check_weights_fit(path, backbone, name)
    state = {k: v for k, v in load_state_dict(str(path)).items() if k in backbone.state_dict()}
    backbone.load_state_dict(state, strict=False)
    return backbone


def check_weights_fit(path, backbone, name) -> None:
    """Raise where a weights file holds tensors the backbone has no place for, or lacks some it needs (timm
    loads such a file with a warning: efficientnet_lite1's file into efficientnet_lite0 leaves 92 tensors
    unused). The classifier, which the backbone drops, may be in the file."""
    from timm.models import load_state_dict
    classifier = backbone.pretrained_cfg.get("classifier") or "classifier"
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    try:
        keys = load_state_dict(str(path))
    except Exception as error:
        raise RuntimeError(f"weights file {path} is not readable: {type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else 'no detail'}") from None
    in_file = {key for key in keys if not key.startswith(tuple(c + "." for c in classifiers))}
    in_model = set(backbone.state_dict())
    extra, missing = sorted(in_file - in_model), sorted(key for key in in_model - in_file
                                                        if not key.endswith("num_batches_tracked"))
    if extra or missing:
        example = f"e.g. {(extra or missing)[0]}"
        raise RuntimeError(f"weights file {path} does not fit model {name}: {len(extra)} of its tensors have no place "
                           f"in the model and {len(missing)} of the model's are not in it ({example}); is it another "
                           "model's file?")


class MaskModel(nn.Module):
    """Backbone(s) plus linear heads. `forward` always returns a dict of logits: `mask`, `gender`,
    `age` for the head kinds, or `class` (18) for the single head; plus `years`, the exact age in
    years, where the model has the auxiliary age regression head (three_head with `age_years`)."""

    def __init__(self, backbones: dict, heads: dict, drop_rate=0.0):
        super().__init__()
        self.backbones = nn.ModuleDict(backbones)
        self.heads = nn.ModuleDict({
            head: nn.Sequential(nn.Dropout(drop_rate),
                                nn.Linear(self.backbones["shared" if "shared" in backbones else head].num_features, n))
            for head, n in heads.items()})

    def group_matcher(self, coarse=False):
        """timm's layer grouping (used by its layer-wise lr decay): each backbone's own layers in order,
        the heads last."""
        layer_of = {f"backbones.{key}.{name}": layer for key, backbone in self.backbones.items()
                    for name, layer in group_parameters(backbone, backbone.group_matcher(coarse), reverse=True).items()}
        return lambda name: layer_of.get(name, float("inf"))

    def forward(self, images):
        if "shared" in self.backbones:
            return self.head_outputs(self.backbones["shared"](images))
        return self.head_outputs({head: self.backbones[head](images) for head in self.heads})

    def head_outputs(self, features):
        """The heads' outputs from the pooled backbone features (one tensor, or one per head)."""
        outputs = {head: layer(features[head] if isinstance(features, dict) else features)
                   for head, layer in self.heads.items()}
        if "years" in outputs:
            outputs["years"] = YEARS_CENTRE + YEARS_SCALE * outputs["years"].float().squeeze(1)
        return outputs


def build_model(kind="three_head", model="resnet18", backbones=None, pretrained=False, drop_rate=0.0,
                drop_path_rate=0.0, age_years=False, sources=None, img_size=None) -> MaskModel:
    """Build one of the three model kinds. `backbones` (multi_backbone only) maps each head to a
    timm name, e.g. {"mask": "convnext_tiny", "gender": "resnext50_32x4d", "age": "swin_s3_tiny_224"};
    heads it leaves out use `model`. `age_years` (three_head only) adds the `years` regression head.
    `sources` maps each model source among the names to its `resolve_source` record (config.json keeps
    them, so a run rebuilds without the source's folder). `img_size` (H, W): the input size, for
    backbones built for one size (ViTs)."""
    sources = sources or {}

    def backbone(name):
        return create_backbone(name, pretrained, drop_path_rate, sources.get(name), img_size)

    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose from {', '.join(MODEL_KINDS)}")
    if age_years and kind != "three_head":
        raise ValueError("the age regression head (age_years) needs kind three_head")
    if kind == "single_head":
        return MaskModel({"shared": backbone(model)}, {"class": 18}, drop_rate)
    if kind == "three_head":
        heads = {**HEADS, "years": 1} if age_years else HEADS
        return MaskModel({"shared": backbone(model)}, heads, drop_rate)
    names = {head: (backbones or {}).get(head) or model for head in HEADS}
    return MaskModel({head: backbone(name) for head, name in names.items()}, HEADS, drop_rate)


def model_sources(names) -> dict:
    """The `resolve_source` record of every model source among `names` (build_model's `sources`)."""
    return {name: resolve_source(name) for name in dict.fromkeys(names) if is_source(name)}


def preprocessing(model: MaskModel) -> dict:
    """Input size, interpolation, mean and std from the (first) backbone's pretrained config."""
    config = timm.data.resolve_data_config({}, model=next(iter(model.backbones.values())))
    return dict(input_size=list(config["input_size"][1:]), interpolation=config["interpolation"],
                mean=list(config["mean"]), std=list(config["std"]))


def check_freeze(spec) -> str:
    """--freeze as "none", "all" or a number of last parameter groups to train (flags.py checks with it too)."""
    spec = str(spec).lower()
    if spec not in ("none", "all") and not spec.isdigit():
        raise ValueError(f"--freeze must be none, all or a number of last stages to train, got {spec!r}")
    return spec


def freeze(model: MaskModel, spec="none") -> tuple:
    """Freeze backbone parameters: "none", "all" (the heads train alone), or an integer N: every
    backbone trains only its last N parameter groups (timm's coarse group matcher: stem, stages or
    blocks, final norm). Returns (trainable, total) parameter counts."""
    spec = check_freeze(spec)
    for param in model.parameters():
        param.requires_grad = True
    if spec != "none":
        for backbone in model.backbones.values():
            groups = timm.models.group_parameters(backbone, backbone.group_matcher(coarse=True))
            ordered = [groups[key] for key in sorted(groups)]
            if spec != "all" and int(spec) >= len(ordered):
                raise ValueError(f"--freeze {spec}: this backbone has {len(ordered)} parameter groups, so nothing "
                                 f"would be frozen; use none, or 0 to {len(ordered) - 1} groups to train")
            frozen = ordered if spec == "all" else ordered[: len(ordered) - int(spec)]
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


TTA_CHOICES = ("none", "hflip")


@torch.no_grad()
def predict(model, loader, amp="off", tta="none", progress=False, channels_last=False, with_years=False):
    """Run `model` over a (prefetch) loader: returns (probabilities (N, 18) float32 on CPU, the
    loader's targets (N, ...)), and with `with_years` the `years` head's ages (N,) (None without
    that head). `tta="hflip"` averages the plain and the flipped predictions; `amp` is a resolved
    precision; `channels_last` feeds the batches in that layout."""
    if tta not in TTA_CHOICES:
        raise ValueError(f"--tta must be {' or '.join(TTA_CHOICES)}, got {tta!r}")
    model.eval()
    device = next(model.parameters()).device
    probs, targets, years = [], [], []
    for images, target in tqdm(loader, desc="predict", disable=not progress, leave=False, dynamic_ncols=True):
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            outputs = model(images)
            batch, age = probs18(outputs), outputs.get("years")
            if tta == "hflip":
                flipped = model(images.flip(3))
                batch = (batch + probs18(flipped)) / 2
                age = None if age is None else (age + flipped["years"]) / 2
        probs.append(batch.float().cpu())
        targets.append(target.cpu())
        if age is not None:
            years.append(age.float().cpu().reshape(-1))
    if not probs:
        probs, targets = torch.zeros(0, 18), torch.zeros(0, dtype=torch.int64)
    else:
        probs, targets = torch.cat(probs), torch.cat(targets)
    if not with_years:
        return probs, targets
    return probs, targets, torch.cat(years) if years else None
