"""A run's page: the self-contained `report.html` of one run folder (settings, learning curves, confusion
matrices, per-class scores, the validation errors as thumbnails, the face crops of a --face_crop run, and
where each head looks). train.py writes it at the end of a run (`--report on`, without the class activation
maps); report.py, the tool, writes it with them and compares runs.

Class activation maps: captum's LayerGradCam (maintained by the PyTorch team, pure Python, works on
CPU without a display) on the last convolution of the backbone each head uses, targeting the head's
predicted class.
"""
import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from augment import preprocess_transform
from dataset import ImageFiles, images_dir, open_upright
from faces import record_words, run_face_crop
from labels import HEAD_NAMES, HEADS, class_name, decode_multi_class, heads_of
from metrics import pyplot, save_confusion_png
from model import build_model
from runs import PROB_COLUMNS, atomic_write, checked_config, load_checkpoint, read_json, read_probabilities
from spec import RunSpec

# the page's order: what the run learned first, then how it was set up, then the details
SECTIONS = {"curves": "Learning curves", "confusion": "Confusion matrices", "settings": "Settings",
            "classes": "Per-class scores", "errors": "Validation errors", "cams": "Where the heads look"}
OPTIONAL_SECTIONS = {"faces": "Face crops"}  # runs trained with --face_crop only
HIDDEN_SETTINGS = ("preprocessing", "model_args", "versions", "heads", "changed_flags")  # nested records, not flags
CSS = """body{font-family:sans-serif;margin:24px;max-width:1400px}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
.changed td{font-weight:bold}.settings td{text-align:left;overflow-wrap:anywhere;max-width:560px}
.settings table{display:inline-table;vertical-align:top;margin:0 24px 12px 0}
.summary{font-size:15px}details{margin:8px 0}summary{cursor:pointer;color:#245}
figure.tile{display:inline-block;vertical-align:top;width:150px;margin:4px 6px 10px 0}
figure.tile img{display:block}figcaption{font-size:11px;line-height:1.3;overflow-wrap:anywhere}
.note{color:#777}img{max-width:100%}"""


def png(figure) -> str:
    """A matplotlib figure as an inline <img>."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    pyplot().close(figure)
    return img_tag(buffer.getvalue(), "image/png")


def img_tag(data: bytes, mime: str, title="") -> str:
    return f'<img src="data:{mime};base64,{base64.b64encode(data).decode()}" title="{html.escape(title)}">'


def thumbnail(path, size=140) -> str:
    image = open_upright(path).convert("RGB")
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return img_tag(buffer.getvalue(), "image/jpeg", str(path))


def table_html(frame: pd.DataFrame, bold_rows=(), css_class="") -> str:
    rows = []
    for index, row in frame.astype(object).iterrows():  # object: a row of ints and floats keeps its ints
        cells = "".join(f"<td>{html.escape(f'{v:.4f}' if isinstance(v, float) else str(v))}</td>" for v in row)
        marker = " class=changed" if index in bold_rows else ""
        rows.append(f"<tr{marker}><td>{html.escape(str(index))}</td>{cells}</tr>")
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [frame.index.name or "", *frame.columns])
    marker = f' class="{css_class}"' if css_class else ""
    return f"<table{marker}><tr>{head}</tr>{''.join(rows)}</table>"


# ---------------------------------------------------------------- what a run holds
VALIDATION_COLUMNS = ["val_loss", "val_f1"] + [f"val_{head}_acc" for head in HEADS]


def load_run(run_dir) -> dict:
    """config, its spec (RunSpec), log, validation probabilities (None for older runs without them) of a run
    folder."""
    run_dir = Path(run_dir)
    config_path, log_path = run_dir / "config.json", run_dir / "log.csv"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.json: is it a train.py run folder?")
    config = checked_config(read_json(config_path), run_dir)  # a baseline's folder: one line that says so
    if not log_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no log.csv: a run stopped before its first epoch?")
    probs = run_dir / "val_probs.csv"
    log = pd.read_csv(log_path)
    for column in VALIDATION_COLUMNS:  # a run trained without validation (--val_ratio 0) has none
        if column not in log:
            log[column] = np.nan
    return dict(name=run_dir.name, dir=run_dir, config=config, spec=RunSpec.of(config),
                log=log, probs=read_probabilities(probs) if probs.is_file() else None)


def setting_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def settings_frame(config, keys, name="setting") -> pd.DataFrame:
    return pd.DataFrame({"value": [setting_text(config[k]) for k in keys]}, index=pd.Index(keys, name=name))


def model_words(spec) -> str:
    """"resnet18 (three_head)", with a multi_backbone run's backbones (from the run's spec)."""
    args = spec.model_args
    backbones = [f"{head}={name}" for head, name in (args.get("backbones") or {}).items()]
    return f"{', '.join([str(args.get('model', '?')), *backbones])} ({args.get('kind', 'three_head')})"


def weights_words(spec):
    """Where the backbones' starting weights came from (the spec's record; None where the run has none)."""
    recorded = spec.starting_weights
    if not recorded:
        return None
    return "; ".join(f"{name}: {line}" if len(recorded) > 1 else str(line) for name, line in recorded.items())


def key_values(run) -> pd.DataFrame:
    """The few resolved settings a reader looks for first."""
    spec, log = run["spec"], run["log"]
    preprocess, training = spec.preprocess, spec.training
    rows = {"model": model_words(spec)}
    size = " × ".join(str(v) for v in preprocess.resize)
    if preprocess.crop:
        size += f" (centre crop {' × '.join(str(v) for v in preprocess.crop)} of the image first)"
    if preprocess.face:
        size += " (face crops)"
    rows["input size (H × W)"] = size
    if training is not None:  # None: an older run's values that today's checks refuse (under All settings)
        rows["epochs"] = (str(training.epochs) if len(log) == training.epochs
                          else f"{len(log)} of {training.epochs} (stopped early)")
        accum = training.grad_accum
        rows["batch size"] = str(training.batch_size) + (f" × {accum} accumulated" if accum > 1 else "")
        rows["learning rate"] = f"{training.lr:g} ({training.optimizer}, {training.scheduler} schedule)"
    if (weights := weights_words(spec)) is not None:
        rows["starting weights"] = weights
    if spec.device_type:
        rows["device"] = f"{spec.device_type}, mixed precision {spec.amp or '?'}"
    return pd.DataFrame({"value": list(rows.values())}, index=pd.Index(list(rows), name="key setting"))


def summary_line(run) -> str:
    """Best F1, its epoch, the model and the training time: the line under the page's title."""
    log = run["log"]
    if log["val_f1"].notna().any():
        best = log.loc[log["val_f1"].idxmax()]
        result = (f"best validation macro F1 <b>{best['val_f1']:.4f}</b> at epoch {int(best['epoch'])} "
                  f"of {len(log)}")
    else:
        result = f"{len(log)} epochs on every image, no validation (--val_ratio 0): best.pth is the last epoch"
    minutes = log["epoch_seconds"].sum() / 60 if "epoch_seconds" in log else float("nan")
    return (f"{result} · model {html.escape(model_words(run['spec']))}"
            + (f" · training time {minutes:.1f} minutes" if minutes == minutes else ""))


def settings_section(run) -> str:
    """The key resolved settings and the flags that differ from train.py's defaults; every setting folded
    below them. A config.json from before `changed_flags` was recorded shows every setting, folded."""
    config = run["config"]
    keys = [k for k in config if k not in HIDDEN_SETTINGS]
    changed = config.get("changed_flags")
    if changed is None:
        shown = missing("this run's config.json does not record which flags differ from the defaults (an older "
                        "run): every setting is under All settings")
    elif not changed:
        shown = missing("every flag at train.py's default")
    else:
        shown = table_html(settings_frame(config, [k for k in keys if k in changed], "flag changed from its default"),
                           css_class="changed-flags")
    changed = changed or []
    everything = table_html(settings_frame(config, [k for k in keys if k in changed]
                                           + [k for k in keys if k not in changed]),
                            bold_rows=set(changed), css_class="all-settings")
    return (f'<div class="settings">{table_html(key_values(run), css_class="key-settings")}{shown}'
            f"<details><summary>All settings ({len(keys)}"
            + (", the changed flags first, in bold" if changed else "")
            + f")</summary>{everything}</details></div>")


def curves_figure(runs) -> str:
    """Train loss per head, validation loss, validation F1 and per-head accuracy, learning rate; one
    line per run (k-fold entries: the mean over folds)."""
    figure, axes = pyplot().subplots(1, 4, figsize=(18, 3.6), layout="constrained")  # no tick labels overlapping
    for run in runs:
        log = run["log"]
        label = run["name"]
        for column in [c for c in log if c.startswith("train_loss")]:
            axes[0].plot(log["epoch"], log[column], label=f"{label} {column.replace('train_loss', 'total').strip('_')}"
                         if len(runs) > 1 else column.replace("train_loss_", "").replace("train_loss", "total"))
        axes[1].plot(log["epoch"], log["val_loss"], label=label)
        axes[2].plot(log["epoch"], log["val_f1"], label=f"{label} F1" if len(runs) > 1 else "macro F1", linewidth=2)
        if len(runs) == 1:
            for head in HEADS:
                axes[2].plot(log["epoch"], log[f"val_{head}_acc"], label=f"{head} acc", linestyle="--")
        axes[3].plot(log["epoch"], log["lr"], label=label)
    for ax, title in zip(axes, ("train loss", "validation loss", "validation F1 / accuracy", "learning rate"),
                         strict=True):
        ax.set(title=title, xlabel="epoch")
        ax.legend(fontsize=7)
    return png(figure)


def confusion_section(probs) -> str:
    targets, preds = probs["ans"].to_numpy(), probs[PROB_COLUMNS].to_numpy().argmax(1)
    buffer = io.BytesIO()
    save_confusion_png(buffer, targets, probs[PROB_COLUMNS].to_numpy(), "18 classes, best epoch")
    parts = [img_tag(buffer.getvalue(), "image/png")]
    figure, axes = pyplot().subplots(1, 3, figsize=(12, 3.6))
    for ax, head, true, pred in zip(axes, HEADS, decode_multi_class(targets), decode_multi_class(preds), strict=True):
        names = HEAD_NAMES[head]
        matrix = confusion_matrix(true, pred, labels=list(range(len(names))))
        ax.imshow(matrix, cmap="Blues")
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, count, ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
        ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names,
               title=head, xlabel="predicted", ylabel="true")
    parts.append(png(figure))
    return "<br>".join(parts)


def class_scores(probs) -> pd.DataFrame:
    targets, preds = probs["ans"].to_numpy(), probs[PROB_COLUMNS].to_numpy().argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(targets, preds, labels=list(range(18)),
                                                                     zero_division=0)
    return pd.DataFrame(dict(precision=precision, recall=recall, f1=f1, support=support),
                        index=pd.Index([f"{c}: {class_name(c)}" for c in range(18)], name="class"))


def errors_section(run, per_head=12) -> str:
    """The validation errors, most confident first, grouped by the head that is wrong."""
    probs, root = run["probs"], images_dir(run["spec"].data_dir)
    matrix = probs[PROB_COLUMNS].to_numpy()
    preds, targets = matrix.argmax(1), probs["ans"].to_numpy()
    wrong = np.stack([t != p for t, p in zip(decode_multi_class(targets), decode_multi_class(preds), strict=True)], 1)
    confidence = matrix.max(1)
    parts = []
    for h, head in enumerate(HEADS):
        rows = np.flatnonzero(wrong[:, h])
        rows = rows[np.argsort(-confidence[rows], kind="stable")][:per_head]
        tiles = "".join(
            f'<figure class="tile">{thumbnail(root / probs["ImageID"].iloc[i])}<figcaption>'
            f'{html.escape(probs["ImageID"].iloc[i])}<br>true: {class_name(targets[i])}<br>'
            f"<b>predicted: {class_name(preds[i])}</b> ({confidence[i]:.2f})</figcaption></figure>"
            for i in rows if (root / probs["ImageID"].iloc[i]).is_file())
        parts.append(f"<h3>{head} wrong: {int(wrong[:, h].sum())} of {len(probs)} images</h3>"
                     + (tiles or '<p class="note">none</p>'))
    return "".join(parts)


def as_seen(spec, paths) -> ImageFiles:
    """`paths`' images as a run (its RunSpec) prepared them for its model: its crop (a --face_crop run's face
    squares) and input size; item i: (image i, i)."""
    faces = run_face_crop(spec, paths)
    return ImageFiles(paths, preprocess_transform(spec.preprocess), faces.regions(paths) if faces else None)


def faces_section(run, n=12) -> str:
    """With --face_crop: a strip of validation crops as the model saw them, and one of the images where
    no face was found (they took the typical face square, or the centre crop in older runs)."""
    config, probs, root = run["config"], run["probs"], images_dir(run["spec"].data_dir)
    record = config["faces"]
    no_face = run["dir"] / "no_face.csv"
    missing_paths = pd.read_csv(no_face)["path"].tolist() if no_face.is_file() else []
    shown = [root / image_id for image_id in probs["ImageID"].head(n)] if probs is not None else []
    paths = [p for p in shown + [Path(p) for p in missing_paths[:n]] if Path(p).is_file()]
    seen = as_seen(run["spec"], paths)

    def strip(items):
        tags = []
        for path in items:
            image = seen[paths.index(Path(path))][0].permute(1, 2, 0).numpy()
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            tags.append(img_tag(buffer.getvalue(), "image/png", Path(path).name))
        return "".join(tags)

    text = f"<p>{record_words(record)}</p>"
    text += f"<h3>validation crops</h3><div>{strip([p for p in shown if p.is_file()])}</div>"
    if missing_paths:
        text += f"<h3>no face found</h3><div>{strip([Path(p) for p in missing_paths[:n]])}</div>"
    return text


def last_conv(module):
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    return convs[-1] if len(convs) > 2 else None


def cams_section(run, n_errors=4, n_correct=2) -> str:
    """Grad-CAM of each head for a few of the most confident errors and a few correct images."""
    from captum.attr import LayerAttribution, LayerGradCam
    probs, root = run["probs"], images_dir(run["spec"].data_dir)
    state = load_checkpoint(run["dir"] / "best.pth")
    model = build_model(**run["spec"].model_args)
    model.load_state_dict(state["model"])
    model.eval()
    matrix = probs[PROB_COLUMNS].to_numpy()
    wrong = np.flatnonzero(matrix.argmax(1) != probs["ans"].to_numpy())
    right = np.flatnonzero(matrix.argmax(1) == probs["ans"].to_numpy())
    chosen = [(i, "error") for i in wrong[np.argsort(-matrix[wrong].max(1))][:n_errors]] + \
             [(i, "correct") for i in right[np.argsort(-matrix[right].max(1))][:n_correct]]
    paths = [root / probs["ImageID"].iloc[i] for i, _ in chosen]
    spec = run["spec"]
    seen = as_seen(spec, [p for p in paths if p.is_file()])
    mean = torch.tensor(spec.preprocess.mean).view(3, 1, 1)
    std = torch.tensor(spec.preprocess.std).view(3, 1, 1)
    heads = list(heads_of(spec.model_args.get("kind")))
    backbones = model.backbones
    layers = {head: last_conv(backbones["shared"] if "shared" in backbones else backbones[head]) for head in heads}
    if not any(layers.values()):
        return '<p class="note">no class activation maps: the backbone has no convolutional layer (ViT / Swin)</p>'
    rows = []
    for (i, kind), path in zip(chosen, paths, strict=True):
        if not path.is_file():
            continue
        image = seen[seen.paths.index(path)][0]
        batch = ((image.float() / 255 - mean) / std)[None].requires_grad_()
        figure, axes = pyplot().subplots(1, len(heads) + 1, figsize=(2.6 * (len(heads) + 1), 2.8))
        axes[0].imshow(image.permute(1, 2, 0).numpy())
        axes[0].set_title(f"{kind}\ntrue {class_name(probs['ans'].iloc[i])}", fontsize=7)
        with torch.no_grad():
            outputs = model(batch)
            predicted = {head: int(outputs[head].argmax(1)) for head in heads}
        for ax, head in zip(axes[1:], heads, strict=True):
            if layers[head] is None:
                ax.set_title(f"{head}: no conv layer", fontsize=7)
                continue
            target = predicted[head]
            cam = LayerGradCam(lambda x, head=head: model(x)[head], layers[head]).attribute(batch, target=target)
            cam = LayerAttribution.interpolate(cam, tuple(image.shape[-2:])).relu()[0, 0].detach()
            ax.imshow(image.permute(1, 2, 0).numpy())
            ax.imshow((cam / cam.max().clamp_min(1e-8)).numpy(), cmap="jet", alpha=0.45)
            names = HEAD_NAMES.get(head)
            ax.set_title(f"{head} -> {names[target] if names else class_name(target)}", fontsize=7)
        for ax in axes:
            ax.axis("off")
        rows.append(png(figure))
    return "".join(rows)


# ---------------------------------------------------------------- one run, or several side by side
def page(title, sections, summary="") -> str:
    """The page: its title, a one-line `summary` (HTML) under it, then the sections in their given order."""
    titles = {**SECTIONS, **OPTIONAL_SECTIONS}
    body = "".join(f'<h2 id="{key}">{titles.get(key, key)}</h2>{content}' for key, content in sections)
    summary = f'<p class="summary">{summary}</p>' if summary else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{summary}{body}</body></html>")


def missing(what) -> str:
    return f'<p class="note">{what}</p>'


def run_report(run_dir, cams=True) -> str:
    """The HTML report of one run folder; parts the run cannot give (an older run without
    val_probs.csv, a ViT without convolutions) say so instead."""
    run = load_run(run_dir)
    sections = [("curves", curves_figure([run]))]
    if run["probs"] is None:
        note = missing("this run has no val_probs.csv (an older run): no confusion matrices, scores or errors")
        sections += [("confusion", note), ("settings", settings_section(run))]
        sections += [(key, note) for key in ("classes", "errors", "cams")]
    else:
        sections += [("confusion", confusion_section(run["probs"])),
                     ("settings", settings_section(run)),
                     ("classes", table_html(class_scores(run["probs"]))),
                     ("errors", errors_section(run))]
        has_model = cams and (run["dir"] / "best.pth").is_file()
        sections.append(("cams", cams_section(run) if has_model else missing("no class activation maps asked for")))
    if run["spec"].preprocess.face and "faces" in run["config"]:
        sections.append(("faces", faces_section(run)))
    return page(f"Run {run['name']}", sections, summary_line(run))


def write_report(run_dir, cams=True) -> Path:
    """Write `run_dir/report.html` atomically; returns its path."""
    path = Path(run_dir) / "report.html"
    text = run_report(run_dir, cams)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path
