"""Criteria (cross entropy, focal, label smoothing, soft macro F1, weighted mixes) and the
multi-head loss."""
import torch
from torch import nn
from torch.nn import functional as F

from dataset import to_class_targets, to_head_targets
from labels import HEADS


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Plain cross entropy (optionally class-weighted)."""


class FocalLoss(nn.Module):
    """Focal loss: cross entropy scaled by (1 - p_target) ** gamma; gamma 0 is cross entropy."""

    def __init__(self, gamma=2.0, weight=None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)

    def forward(self, logits, target):
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -((1 - log_p.exp()) ** self.gamma) * log_p
        if self.weight is None:
            return loss.mean()
        weight = self.weight[target]
        return (loss * weight).sum() / weight.sum()


class LabelSmoothingLoss(nn.Module):
    """Cross entropy against targets smoothed over the logits' real number of classes."""

    def __init__(self, smoothing=0.1, weight=None):
        super().__init__()
        self.smoothing = smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits, target):
        return F.cross_entropy(logits.float(), target, weight=self.weight, label_smoothing=self.smoothing)


class F1Loss(nn.Module):
    """1 - soft macro F1 (softmax probabilities as soft counts), differentiable."""

    def __init__(self, epsilon=1e-7, weight=None):
        super().__init__()
        self.epsilon = epsilon

    def forward(self, logits, target):
        probs = F.softmax(logits.float(), dim=1)
        one_hot = F.one_hot(target, logits.shape[1]).float()
        tp = (probs * one_hot).sum(0)
        fp = (probs * (1 - one_hot)).sum(0)
        fn = ((1 - probs) * one_hot).sum(0)
        f1 = 2 * tp / (2 * tp + fp + fn + self.epsilon)
        return 1 - f1.mean()


class SoftAgeLoss(nn.Module):
    """Cross entropy of the age head against soft targets from the exact age: each group gets the
    mass of a Gaussian (`sigma` years) around the age that falls in it, so a 29-year-old is partly
    30-59 and a 45-year-old is not. It knows distance where hard bins do not."""
    needs_exact_age = True

    def __init__(self, sigma=3.0, bins=(30, 60)):
        super().__init__()
        self.sigma = float(sigma)
        self.register_buffer("edges", torch.tensor([float(b) - 0.5 for b in bins]))

    def soft_targets(self, ages: torch.Tensor) -> torch.Tensor:
        normal = torch.distributions.Normal(ages.float()[:, None], self.sigma, validate_args=False)  # no host sync
        below = normal.cdf(self.edges[None, :])  # P(age < edge) for each edge
        mass = torch.cat([below[:, :1], below[:, 1:] - below[:, :-1], 1 - below[:, -1:]], dim=1)
        return mass / mass.sum(1, keepdim=True)

    def forward(self, logits, ages):
        return -(self.soft_targets(ages) * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


class AgeYearsLoss(nn.Module):
    """Mean absolute error of the `years` head in tens of years (robust to a wrong age here and
    there): the auxiliary exact-age regression beside the age groups."""
    needs_exact_age = True

    def forward(self, years, ages):
        return F.l1_loss(years.float(), ages.float()) / 10


class MixLoss(nn.Module):
    """A weighted sum of criteria, e.g. 0.6 focal + 0.4 f1."""

    def __init__(self, criteria, weights):
        super().__init__()
        self.criteria, self.weights = nn.ModuleList(criteria), list(weights)

    def forward(self, logits, target):
        return sum(w * c(logits, target) for c, w in zip(self.criteria, self.weights, strict=True))


CRITERIA = {"cross_entropy": CrossEntropyLoss, "focal": FocalLoss, "label_smoothing": LabelSmoothingLoss,
            "f1": F1Loss}


def create_criterion(name, num_classes, gamma=2.0, smoothing=0.1, class_weights=None) -> nn.Module:
    """A criterion by name: cross_entropy, focal, label_smoothing, f1, or a weighted mix written
    `focal:0.6+f1:0.4`. `class_weights` (num_classes values) weight the classes where the loss allows."""
    weight = None
    if class_weights is not None:
        weight = torch.as_tensor(class_weights, dtype=torch.float32)
        if weight.numel() != num_classes:
            raise ValueError(f"class weights need {num_classes} values, got {weight.numel()}")
    if "+" in name or ":" in name:
        parts = [part.split(":") for part in name.split("+")]
        if any(len(p) != 2 for p in parts):
            raise ValueError(f"a loss mix is written like focal:0.6+f1:0.4, got {name!r}")
        return MixLoss([create_criterion(p[0], num_classes, gamma, smoothing, class_weights) for p in parts],
                       [float(p[1]) for p in parts])
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; choose from {', '.join(CRITERIA)} "
                         "or a mix like focal:0.6+f1:0.4")
    if name == "focal":
        return FocalLoss(gamma, weight)
    if name == "label_smoothing":
        return LabelSmoothingLoss(smoothing, weight)
    return CRITERIA[name](weight=weight)


class MultiHeadLoss(nn.Module):
    """A criterion per head and per-head weights; returns (total, {head: loss}). Targets may be
    18-class ids (N,) or (mask, gender, age) columns (N, 3): each head gets its own."""

    def __init__(self, criteria: dict, weights: dict = None):
        super().__init__()
        self.criteria = nn.ModuleDict(criteria)
        self.weights = {head: float((weights or {}).get(head, 1.0)) for head in criteria}

    def forward(self, outputs: dict, targets: torch.Tensor):
        if "class" in outputs:
            per_head = {"class": to_class_targets(targets)}
        else:
            columns = to_head_targets(targets)
            per_head = {head: columns[:, i] for i, head in enumerate(HEADS)}
            for head, criterion in self.criteria.items():
                if getattr(criterion, "needs_exact_age", False):
                    if columns.shape[1] < 4:
                        raise ValueError("--age_soft and --age_years need the exact age in the targets "
                                         "(MultiLabelDataset)")
                    per_head[head] = columns[:, 3]
        parts = {head: self.criteria[head](outputs[head], per_head[head]) for head in self.criteria}
        total = sum(self.weights[head] * loss for head, loss in parts.items())
        return total, parts


def create_multi_head_loss(criterion="cross_entropy", heads=HEADS, head_weights=None, class_weights=None,
                           age_soft=0.0, age_bins=(30, 60), age_years=0.0, **kwargs) -> MultiHeadLoss:
    """`criterion`: one name for every head, or a dict {head: name} (heads left out use cross
    entropy); `heads` maps head -> number of classes; `class_weights` is a dict {head: weights};
    `age_soft` > 0 replaces the age criterion by SoftAgeLoss with that sigma (years); `age_years`
    > 0 adds the `years` head's AgeYearsLoss with that weight."""
    names = criterion if isinstance(criterion, dict) else {head: criterion for head in heads}
    for given in (names, head_weights or {}, class_weights or {}):
        unknown = set(given) - set(heads)
        if unknown:
            raise ValueError(f"setting given for unknown heads {sorted(unknown)}; heads are {', '.join(heads)}")
    criteria = {head: create_criterion(names.get(head, "cross_entropy"), n,
                                       class_weights=(class_weights or {}).get(head), **kwargs)
                for head, n in heads.items()}
    if age_soft:
        criteria["age"] = SoftAgeLoss(age_soft, age_bins)
    if age_years:
        criteria["years"] = AgeYearsLoss()
        head_weights = {**(head_weights or {}), "years": age_years}
    return MultiHeadLoss(criteria, head_weights)
