"""Scores on the whole validation or hold-out set: macro F1 over 18 classes, per-head accuracy
and F1, a per-class report, and the confusion matrix picture."""
import numpy as np
from sklearn.metrics import classification_report, confusion_matrix, f1_score

from labels import HEADS, decode_multi_class


def macro_f1(targets, preds) -> float:
    """Macro F1 over the classes present in targets or predictions (the competition's metric)."""
    return float(f1_score(targets, preds, average="macro", zero_division=0))


def score(targets, probs) -> dict:
    """18-class targets (N,) and probabilities (N, 18) -> f1, acc, and <head>_acc / <head>_f1."""
    targets, preds = np.asarray(targets), np.asarray(probs).argmax(1)
    result = {"f1": macro_f1(targets, preds), "acc": float((preds == targets).mean()) if len(targets) else 0.0}
    for head, true, pred in zip(HEADS, decode_multi_class(targets), decode_multi_class(preds), strict=True):
        result[f"{head}_acc"] = float((true == pred).mean()) if len(targets) else 0.0
        result[f"{head}_f1"] = macro_f1(true, pred)
    return result


def apply_offsets(probs, offsets) -> np.ndarray:
    """Probabilities with per-class log-prior offsets added (renormalised): argmax(log p + offsets)."""
    logits = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1)) + np.asarray(offsets)
    logits -= logits.max(1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(1, keepdims=True)


OFFSET_GRID = np.linspace(-2, 2, 21)


def fit_offsets(targets, probs, grid=OFFSET_GRID, passes=3) -> np.ndarray:
    """Per-class log-prior offsets that raise the macro F1 of argmax(log p + offsets) on (validation)
    `targets`, by coordinate ascent over `grid`: macro F1 rewards the small classes (60+, incorrect
    mask) that a plain argmax under-predicts. Fit on validation probabilities only."""
    targets, log_probs = np.asarray(targets), np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1))
    offsets = np.zeros(log_probs.shape[1])
    best = macro_f1(targets, log_probs.argmax(1))
    for _ in range(passes):
        improved = False
        for c in range(len(offsets)):
            for value in grid:
                trial = offsets.copy()
                trial[c] = value
                f1 = macro_f1(targets, (log_probs + trial).argmax(1))
                if f1 > best + 1e-9:
                    best, offsets, improved = f1, trial, True
        if not improved:
            break
    return offsets


def class_report(targets, probs) -> str:
    return classification_report(targets, np.asarray(probs).argmax(1), labels=list(range(18)), zero_division=0)


def pyplot():
    """matplotlib.pyplot drawing off screen (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_confusion_png(path, targets, probs, title=""):
    """An 18x18 confusion matrix with counts, rows true, columns predicted. Fixed margins, not tight_layout:
    measuring the layout drew the figure twice, half its time (train.py writes one per best epoch)."""
    plt = pyplot()
    matrix = confusion_matrix(targets, np.asarray(probs).argmax(1), labels=list(range(18)))
    figure, axes = plt.subplots(figsize=(8, 8))
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.07, top=0.95)
    axes.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            axes.text(j, i, count, ha="center", va="center", fontsize=7,
                      color="white" if count > matrix.max() / 2 else "black")
    axes.set(xticks=range(18), yticks=range(18), xlabel="predicted class", ylabel="true class", title=title)
    figure.savefig(path, format="png", dpi=80)
    plt.close(figure)
