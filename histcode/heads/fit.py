"""Fitting one head on training bags with early stopping on validation bags, and predicting with it.

Aggregators: ``attention`` (CLAM_SB; the multi-task DE head for the DE task; the Cox attention head for survival),
``max`` (max-instance MIL; class tasks only), ``mean`` (mean-pooled slide vectors into scikit-learn: logistic
regression for classes, ridge regression for log2FC; for survival a ridge-penalised linear Cox model fitted
here) and ``guided`` (the same linear models over slide vectors pooled by a tumour head's attention, for the
tasks read from the tumour: subtype and DE; ``histcode.heads.guided``). Torch heads train one
bag at a time with Adam on ``heads.device`` (CUDA when present under ``auto``; each bag is moved there once, not
per epoch); the state with the lowest validation loss is kept,
training stops ``patience`` epochs after it (never before ``min_epochs``), and the fitted model comes back on the
CPU for export and prediction. As CLAM trains at scale: tile features standardised per task (``standardise``:
centred on the training bags' tile mean and scaled by one sd, or per feature, or scaled by that sd without
centring, as the tumour head is by default because centring costs its attention the localisation; the statistics
are buffers of the exported model, so prediction applies the same),
and class-balanced bag sampling (``balanced_sampling``: each epoch draws as many bags as there are, with
replacement, each with probability inversely proportional to its class's size, as CLAM's weighted sampler).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from histcode.config import HeadsConfig
from histcode.heads.models import MultiTaskDE
from histcode.runtime import resolve_device

log = logging.getLogger(__name__)

GUIDED = "guided"  # a linear model over bags pooled by the tumour head's attention (``GuidedLinear``)


class PerGeneDE(nn.Module):
    """The paper's variant: one attention model per gene; outputs stacked as the multi-task head's."""

    def __init__(self, in_dim: int, n_genes: int) -> None:
        super().__init__()
        self.models = nn.ModuleList([MultiTaskDE(in_dim, 1) for _ in range(n_genes)])

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [m(bag) for m in self.models]
        return torch.cat([o for o, _ in outs]), torch.stack([a for _, a in outs]).mean(dim=0)

    def tile_scores(self, bag: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.tile_scores(bag) for m in self.models], dim=1)

    def loss(self, bag: torch.Tensor, log2fc: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return sum(m.loss(bag, log2fc[i:i + 1], classes[i:i + 1]) for i, m in enumerate(self.models))


class MeanPoolLinear(nn.Module):
    """Mean-pooled tiles, standardised, into a linear model fitted by scikit-learn, as a torch module so that
    every head shares one interface and one export format. Classes: logistic regression; DE: ridge regression of
    log2FC and a logistic regression per classified gene (genes without one output NaN probabilities); survival
    (``risk``): a ridge-penalised linear Cox model, whose output is the log-risk."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                 de_weight: np.ndarray | None = None, de_bias: np.ndarray | None = None, risk: bool = False) -> None:
        super().__init__()
        self.risk = risk  # survival: the linear output is the log-risk itself (a Cox model), no softmax
        f = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        self.register_buffer("mean", f(mean))
        self.register_buffer("scale", f(scale))
        self.register_buffer("weight", f(weight))  # (outputs, dim): class logits, or DE log2FC per gene
        self.register_buffer("bias", f(bias))
        self.de = de_weight is not None
        if self.de:
            self.register_buffer("de_weight", f(de_weight))  # (genes, 3, dim)
            self.register_buffer("de_bias", f(de_bias))  # (genes, 3); -inf for absent classes, NaN: no model

    def pool(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slide vector, each tile's weight in it): the mean of the tiles."""
        return bag.mean(dim=0), torch.full((bag.shape[0],), 1.0 / bag.shape[0], dtype=bag.dtype)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vector, attention = self.pool(bag)
        z = (vector - self.mean) / self.scale
        if self.risk:
            return z @ self.weight.T + self.bias, attention
        if not self.de:
            return torch.softmax(z @ self.weight.T + self.bias, dim=-1), attention
        fc = z @ self.weight.T + self.bias
        probs = torch.softmax(self.de_weight @ z + self.de_bias, dim=-1)  # NaN rows stay NaN
        return torch.cat([fc[:, None], probs], dim=1), attention

    def tile_scores(self, bag: torch.Tensor) -> torch.Tensor:
        """Each tile alone (the mean of a bag of one): class probabilities, or per gene the log2FC (n, genes)."""
        z = (bag - self.mean) / self.scale
        out = z @ self.weight.T + self.bias
        return out if self.de or self.risk else torch.softmax(out, dim=-1)


class GuidedLinear(MeanPoolLinear):
    """A linear model over slide vectors pooled by another head's attention (the tumour head's: ``guided``):
    the vector is sum_i a_i h_i over the raw tile vectors, a_i the guide's attention, so a tumour's subtype or
    expression is read from the tiles the tumour head finds, not diluted by the benign tissue around them. The
    guide is frozen and travels inside the module; the attention it returns is the guide's."""

    def __init__(self, guide: nn.Module, *linear, **de) -> None:
        super().__init__(*linear, **de)
        self.guide = guide.eval().requires_grad_(False)

    def pool(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return guided_pool(self.guide, bag)


def guided_pool(guide: nn.Module, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i a_i h_i, a): the bag pooled by the attention ``a`` of ``guide`` (a head: bag -> (outputs, a))."""
    attention = guide(bag)[1]
    return attention @ bag, attention


def pool_bags(bags: list[np.ndarray], guide: nn.Module | None = None) -> np.ndarray:
    """Slide vectors (n, dim): each bag's mean, or its ``guide``-attention-weighted sum of tiles."""
    if guide is None:
        return np.stack([bag.mean(axis=0) for bag in bags])
    guide.eval()
    with torch.no_grad():
        pooled = [guided_pool(guide, torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)))[0] for b in bags]
    return np.stack([v.numpy() for v in pooled])


class Standardised(nn.Module):
    """A torch head whose inputs are standardised first: (bag - mean) / scale, then the head; its ``loss`` and
    ``tile_scores`` see the same standardised tiles."""

    def __init__(self, head: nn.Module, mean: np.ndarray, scale: np.ndarray) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))

    def _z(self, bag: torch.Tensor) -> torch.Tensor:
        return (bag - self.mean) / self.scale

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self._z(bag))

    def loss(self, bag: torch.Tensor, *target) -> torch.Tensor:
        return self.head.loss(self._z(bag), *target)

    def tile_scores(self, bag: torch.Tensor) -> torch.Tensor:
        return self.head.tile_scores(self._z(bag))


def tile_statistics(bags: list[np.ndarray], per_feature: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Mean of every tile of ``bags`` per feature and their sd, per feature or (``per_feature`` False) one sd
    over all features, the root of the mean variance (sd 0 replaced by 1); accumulated bag by bag."""
    n = sum(len(b) for b in bags)
    total = sum(b.sum(axis=0, dtype=np.float64) for b in bags)
    mean = total / n
    var = sum(((b - mean) ** 2).sum(axis=0, dtype=np.float64) for b in bags) / max(n - 1, 1)
    sd = np.sqrt(var) if per_feature else np.full_like(var, np.sqrt(var.mean()))
    return mean.astype(np.float32), np.where(sd > 0, sd, 1.0).astype(np.float32)


def epoch_order(rng: np.random.Generator, n: int, classes: np.ndarray | None, balanced: bool) -> np.ndarray:
    """The ``n`` bags of one epoch: a permutation, or (balanced, with classes) ``n`` draws with replacement, each
    bag with probability inversely proportional to its class's size."""
    if classes is None or not balanced:
        return rng.permutation(n)
    counts = np.bincount(classes)
    weights = 1.0 / counts[classes]
    return rng.choice(len(classes), size=len(classes), replace=True, p=weights / weights.sum())


@dataclass
class FittedHead:
    aggregator: str
    model: nn.Module  # every head, mean-pool ones included, is a torch module: bag -> (outputs, attention)
    epochs: int = 0
    best_val_loss: float | None = None

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One bag -> (outputs, attention over its tiles). Class tasks: probabilities; DE: (genes, 4) with
        [log2FC, p_down, p_unchanged, p_up] per gene."""
        self.model.eval()
        with torch.no_grad():
            out, att = self.model(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
        return out.numpy(), att.numpy()


def fit_head(kind, aggregator: str, train: list[tuple[np.ndarray, object]], val: list[tuple[np.ndarray, object]],
             shape: dict[str, int], cfg: HeadsConfig, seed: int, guide: nn.Module | None = None) -> FittedHead:
    """``kind``: the task kind (``histcode.heads.tasks``), which builds the model, scores a step's bags against
    their targets (``batch_loss``: the mean of the bags' losses, or for survival the Cox partial likelihood over
    the step's bags), sets the epochs and bags per step (``schedule``), fits the mean-pool head and finishes the
    fitted model (``finalise``: survival heads keep their training median risk); ``train`` / ``val``: (bag
    features, target) pairs; ``shape``: the task's output sizes (classes, genes); ``guide``: the head whose
    attention pools the bags of ``guided``."""
    bags = [bag for bag, _ in train]
    if aggregator == "mean":
        return FittedHead("mean", kind.finalise(kind.fit_linear(train, seed, cfg).eval(), bags))
    if aggregator == GUIDED:
        if guide is None:
            raise ValueError("the guided aggregator needs a guide: a tumour head fitted on the same training patients")
        return FittedHead(GUIDED, kind.finalise(kind.fit_linear(train, seed, cfg, guide).eval(), bags))
    torch.manual_seed(seed)
    device = resolve_device(cfg.device)
    in_dim = train[0][0].shape[1]
    plan = kind.schedule(cfg)
    model = kind.torch_model(aggregator, in_dim, shape, cfg)
    mode = cfg.standardise_for(kind.name)
    if mode != "none":
        mean, scale = tile_statistics([bag for bag, _ in train], mode == "feature")
        model = Standardised(model, np.zeros_like(mean) if mode == "scale" else mean, scale)
    model = model.to(device)
    classes = np.array([int(t) for _, t in train]) if kind.needs_every_class else None
    on_device = lambda pairs: [(torch.as_tensor(b, device=device), t) for b, t in pairs]  # noqa: E731
    train, val = on_device(train), on_device(val)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(seed)
    best, best_state, stale, epoch = float("inf"), copy.deepcopy(model.state_dict()), 0, 0
    for epoch in range(1, plan.epochs + 1):
        model.train()
        order = epoch_order(rng, len(train), classes, cfg.balanced_sampling)
        for start in range(0, len(order), plan.bags_per_step):  # bags differ in length: their losses are averaged
            loss = kind.batch_loss(model, [train[i] for i in order[start:start + plan.bags_per_step]])
            if not loss.requires_grad:  # e.g. a Cox batch without an event: nothing to learn from it
                continue
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val_loss = float(kind.batch_loss(model, val).item()) if val else float("nan")
        if not np.isfinite(val_loss):  # no validation bags (or, for survival, no event among them): the last state
            best_state, best = copy.deepcopy(model.state_dict()), float("nan")
            continue
        if val_loss < best - 1e-6:
            best, best_state, stale = val_loss, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= plan.patience and epoch >= plan.min_epochs:
                break
    model.load_state_dict(best_state)
    model.cpu().eval()
    return FittedHead(aggregator, kind.finalise(model, [bag for bag, _ in train]), epoch, best)


def _standardised_means(train: list[tuple[np.ndarray, object]], guide: nn.Module | None = None):
    """Pooled bags (``pool_bags``), standardised: (z, the fitted scaler's mean, its scale with zeros replaced by 1)."""
    from sklearn.preprocessing import StandardScaler

    x = pool_bags([bag for bag, _ in train], guide)
    scaler = StandardScaler().fit(x)
    return scaler.transform(x), scaler.mean_, np.where(scaler.scale_ > 0, scaler.scale_, 1.0)


def _logits(clf, n_classes: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A fitted logistic regression as logit weights over ``n_classes`` (absent classes: -inf bias)."""
    w = np.zeros((n_classes, dim))
    b = np.full(n_classes, -np.inf)
    if len(clf.classes_) == 2:  # sklearn's binary form: one logit for the second class, 0 for the first
        w[clf.classes_[1]], b[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
        b[clf.classes_[0]] = 0.0
    else:
        w[clf.classes_], b[clf.classes_] = clf.coef_, clf.intercept_
    return w, b


def fit_mean_cox(train: list[tuple[np.ndarray, object]], ridge: float, guide: nn.Module | None = None
                 ) -> MeanPoolLinear:
    """A linear Cox model on standardised pooled bags: the weights minimise the Breslow negative log partial
    likelihood (mean over the events, every training bag in one risk set) plus ``ridge`` / 2 * |w|^2, by L-BFGS
    from zero (deterministic; the objective is convex). Targets are (time, event); the bias is 0 (a Cox model has
    none)."""
    from histcode.heads.models import cox_loss

    z, mean, scale = _standardised_means(train, guide)
    x = torch.as_tensor(z, dtype=torch.float64)
    time = torch.tensor([float(t[0]) for _, t in train], dtype=torch.float64)
    event = torch.tensor([float(t[1]) for _, t in train], dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], lr=1.0, max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = cox_loss(x @ w, time, event) + 0.5 * ridge * (w * w).sum()
        loss.backward()
        return loss

    if bool((event > 0).any()):
        optimizer.step(objective)
    weight = w.detach().numpy()[None, :]
    return _linear(guide, mean, scale, weight, np.zeros(1), risk=True)


def _linear(guide: nn.Module | None, *params, **de) -> MeanPoolLinear:
    return MeanPoolLinear(*params, **de) if guide is None else GuidedLinear(guide, *params, **de)


def fit_mean_classes(train: list[tuple[np.ndarray, object]], seed: int, guide: nn.Module | None = None) -> MeanPoolLinear:
    """Logistic regression on standardised pooled bags (mean, or ``guide``'s attention); targets are class ids."""
    from sklearn.linear_model import LogisticRegression

    z, mean, scale = _standardised_means(train, guide)
    y = np.array([int(t) for _, t in train])
    clf = LogisticRegression(max_iter=2000, random_state=seed).fit(z, y)
    w, b = _logits(clf, int(y.max()) + 1, z.shape[1])
    return _linear(guide, mean, scale, w, b)


def fit_mean_de(train: list[tuple[np.ndarray, object]], seed: int, guide: nn.Module | None = None) -> MeanPoolLinear:
    """Ridge regression of log2FC and a logistic regression per classified gene on standardised pooled bags (mean,
    or ``guide``'s attention); targets are (log2FC, class ids) per gene."""
    from sklearn.linear_model import LogisticRegression, Ridge

    z, mean, scale = _standardised_means(train, guide)
    fc = np.stack([t[0] for _, t in train])
    cls = np.stack([t[1] for _, t in train])
    ridge = Ridge(alpha=10.0).fit(z, np.nan_to_num(fc))
    de_w = np.zeros((cls.shape[1], 3, z.shape[1]))
    de_b = np.full((cls.shape[1], 3), np.nan)
    for g in range(cls.shape[1]):
        known = cls[:, g] >= 0
        if known.sum() and len(np.unique(cls[known, g])) > 1:
            clf = LogisticRegression(max_iter=2000, random_state=seed).fit(z[known], cls[known, g])
            de_w[g], de_b[g] = _logits(clf, 3, z.shape[1])
    return _linear(guide, mean, scale, ridge.coef_, ridge.intercept_, de_weight=de_w, de_bias=de_b)
