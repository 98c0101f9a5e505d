"""Slide-level heads over bags of tile embeddings.

- ``GatedAttention`` (Ilse et al. 2018): a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i))); with several
  branches (CLAM_MB) w is one row per branch and each branch is a softmax over the tiles of its own.
- ``CLAMSingleBranch`` (Lu et al. 2021, CLAM_SB as in the paper): fc 1024->512 (here in_dim->512) + ReLU, gated
  attention 512->256->1, slide vector sum_i a_i h_i, a bag classifier, and instance clustering: the top and bottom
  k attended tiles are pseudo-labelled positive/negative for the slide's class and an instance classifier learns
  them; loss = 0.7 * bag loss + 0.3 * instance loss.
- ``CLAMMultiBranch`` (Lu et al. 2021, CLAM_MB): the same fc, gated attention 512->256->n_classes (one attention
  branch per class, each a softmax over the tiles), one slide vector per class M = A h (n_classes, 512), class c's
  logit from its own Linear(512, 1) on row c of M, and instance clustering of class c on class c's branch.
- ``MaxInstance``: every tile classified, the slide scored by its most confident tile (max pooling).
- ``MultiTaskDE``: the same attention backbone predicting, for every panel gene, log2FC (regression) and
  up/down/unchanged (classification) from one slide vector.
- ``SurvivalAttention``: the same attention backbone predicting one log-risk per slide, trained by the Cox
  partial likelihood (``cox_loss``, Breslow's ties) over the bags of a mini-batch (the risk sets need several
  patients); ``WithRiskReference`` carries the training bags' median risk beside it (the high/low call).
Every forward takes one bag (n_tiles, in_dim) and returns (outputs, attention over the n tiles); every
``tile_scores`` takes the same bag and returns each tile's outputs as if it were a bag of one, for all tiles in
one batched pass (n_tiles, outputs): class probabilities, or per gene the predicted log2FC. ``WithTileScores``
is the module that is exported and registered: its forward returns both, so a loaded head scores every tile of
a slide in one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

N_DE_CLASSES = 3  # down, unchanged, up


class GatedAttention(nn.Module):
    """Gated attention with ``branches`` outputs per tile (1: CLAM_SB's, n_classes: CLAM_MB's). The scoring
    layer is ``score`` = Linear(hidden, branches) for any number of branches, so single-branch state dicts keep
    their keys and shapes."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.25, branches: int = 1) -> None:
        super().__init__()
        self.tanh = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.sigmoid = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.score = nn.Linear(hidden, branches)

    def branches(self, h: torch.Tensor) -> torch.Tensor:
        """h (n, dim) -> attention (branches, n), each branch summing to 1 over the tiles."""
        return torch.softmax(self.score(self.tanh(h) * self.sigmoid(h)).T, dim=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (n, dim) -> attention (n,) summing to 1: the first (for CLAM_SB the only) branch."""
        return self.branches(h)[0]


class _AttentionBackbone(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 512, attention_hidden: int = 256, dropout: float = 0.25,
                 branches: int = 1) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(hidden, attention_hidden, dropout, branches)

    def pool(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tile features (n, hidden), attention (n,), slide vector (hidden,))."""
        h = self.fc(bag)
        a = self.attention(h)
        return h, a, (a[:, None] * h).sum(dim=0)


class CLAMSingleBranch(_AttentionBackbone):
    """CLAM_SB. Instance clustering as in CLAM: the slide's own class's instance classifier learns its top-k
    attended tiles as positive and bottom-k as negative; with ``subtyping`` (every slide belongs to one of the
    classes, e.g. LUAD vs LUSC) each other class's classifier also learns the top-k tiles as negative, and the
    instance loss is averaged over the classifiers. k is at most half the bag, so no tile is labelled both
    ways; a one-tile bag trains the bag classifier (and, with subtyping, the out-of-class branch) only."""

    def __init__(self, in_dim: int, n_classes: int = 2, k_sample: int = 8, bag_weight: float = 0.7,
                 subtyping: bool = False, **kw) -> None:
        super().__init__(in_dim, **kw)
        hidden = self.fc[0].out_features
        self.classifier = nn.Linear(hidden, n_classes)
        self.instance_classifiers = nn.ModuleList([nn.Linear(hidden, 2) for _ in range(n_classes)])
        self.k_sample, self.bag_weight, self.n_classes, self.subtyping = k_sample, bag_weight, n_classes, subtyping

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bag (n, in_dim) -> (class probabilities (n_classes,), attention (n,))."""
        _, a, v = self.pool(bag)
        return torch.softmax(self.classifier(v), dim=-1), a

    def instance_loss(self, h: torch.Tensor, a: torch.Tensor, label: int) -> torch.Tensor:
        """h (n, hidden), a (n,) -> CLAM's instance loss, every class's classifier on the one attention."""
        return clam_instance_loss(self.instance_classifiers, h, a.expand(self.n_classes, -1), label, self.k_sample,
                                  self.subtyping)

    def tile_scores(self, bag: torch.Tensor) -> torch.Tensor:
        """Each tile's class probabilities from its own features (a bag of one attends to its only tile)."""
        return torch.softmax(self.classifier(self.fc(bag)), dim=-1)

    def loss(self, bag: torch.Tensor, label: int) -> torch.Tensor:
        h, a, v = self.pool(bag)
        bag_loss = F.cross_entropy(self.classifier(v)[None], torch.tensor([label], device=bag.device))
        return self.bag_weight * bag_loss + (1 - self.bag_weight) * self.instance_loss(h, a, label)


def clam_instance_loss(classifiers: nn.ModuleList, h: torch.Tensor, a: torch.Tensor, label: int, k_sample: int,
                       subtyping: bool) -> torch.Tensor:
    """CLAM's instance clustering loss (inst_eval / inst_eval_out). h (n, hidden) tile features; a (n_classes, n)
    the attention each class's instance classifier reads (CLAM_SB: the same row for every class; CLAM_MB: class
    c's branch). The slide's class ``label`` learns its top-k tiles as positive and its bottom-k as negative, with
    k at most half the bag so that no tile is labelled both ways; with ``subtyping`` every other class learns its
    top-k (k at most the bag) as negative and the sum is divided by the number of classifiers. A one-tile bag has
    no in-class term (zero loss without subtyping)."""
    total, n = h.sum() * 0, a.shape[1]
    k_in, k_out = min(k_sample, n // 2), min(k_sample, n)
    for c, classifier in enumerate(classifiers):
        if c == label and k_in > 0:
            top, bottom = torch.topk(a[c], k_in).indices, torch.topk(-a[c], k_in).indices
            targets = torch.cat([torch.ones(k_in), torch.zeros(k_in)]).long().to(h.device)
            total = total + F.cross_entropy(classifier(torch.cat([h[top], h[bottom]])), targets)
        elif c != label and subtyping:
            top = torch.topk(a[c], k_out).indices
            total = total + F.cross_entropy(classifier(h[top]), torch.zeros(k_out, dtype=torch.long, device=h.device))
    return total / len(classifiers) if subtyping else total


class CLAMMultiBranch(_AttentionBackbone):
    """CLAM_MB: one gated-attention branch per class over the shared fc features h (n, hidden); class c pools
    the bag by its own branch, M[c] = sum_i A[c, i] h_i, and its own Linear(hidden, 1) gives logit c from M[c].
    Instance clustering as ``CLAMSingleBranch``'s, except that class c's instance classifier reads class c's
    branch: in-class, its top-k tiles positive and bottom-k negative (k at most half the bag); out-of-class with
    ``subtyping``, its top-k tiles negative. The attention ``forward`` returns is the predicted class's branch."""

    def __init__(self, in_dim: int, n_classes: int = 2, k_sample: int = 8, bag_weight: float = 0.7,
                 subtyping: bool = False, **kw) -> None:
        super().__init__(in_dim, branches=n_classes, **kw)
        hidden = self.fc[0].out_features
        self.classifiers = nn.ModuleList([nn.Linear(hidden, 1) for _ in range(n_classes)])
        self.instance_classifiers = nn.ModuleList([nn.Linear(hidden, 2) for _ in range(n_classes)])
        self.k_sample, self.bag_weight, self.n_classes, self.subtyping = k_sample, bag_weight, n_classes, subtyping

    def pool(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tile features h (n, hidden), attention per class A (n_classes, n), slide vector per class A h
        (n_classes, hidden))."""
        h = self.fc(bag)
        a = self.attention.branches(h)
        return h, a, a @ h

    def logits(self, m: torch.Tensor) -> torch.Tensor:
        """(..., n_classes, hidden) class vectors -> (..., n_classes) logits, class c's classifier on row c."""
        return torch.cat([classifier(m[..., c, :]) for c, classifier in enumerate(self.classifiers)], dim=-1)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bag (n, in_dim) -> (class probabilities (n_classes,), the predicted class's attention branch (n,))."""
        _, a, m = self.pool(bag)
        probs = torch.softmax(self.logits(m), dim=-1)
        return probs, a[torch.argmax(probs)]

    def tile_scores(self, bag: torch.Tensor) -> torch.Tensor:
        """Each tile's class probabilities as a bag of one (n, n_classes): every branch attends to its only tile,
        so class c's logit is classifier_c(fc(tile))."""
        h = self.fc(bag)
        return torch.softmax(torch.cat([classifier(h) for classifier in self.classifiers], dim=-1), dim=-1)

    def loss(self, bag: torch.Tensor, label: int) -> torch.Tensor:
        h, a, m = self.pool(bag)
        bag_loss = F.cross_entropy(self.logits(m)[None], torch.tensor([label], device=bag.device))
        instance = clam_instance_loss(self.instance_classifiers, h, a, label, self.k_sample, self.subtyping)
        return self.bag_weight * bag_loss + (1 - self.bag_weight) * instance


class MaxInstance(nn.Module):
    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 256, dropout: float = 0.25) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes))

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The slide's logits are those of the tile with the highest non-first-class logit margin; the
        'attention' is a one-hot on that tile."""
        logits = self.net(bag)
        margin = logits[:, 1:].max(dim=1).values - logits[:, 0]
        best = torch.argmax(margin)
        attention = torch.zeros_like(margin).scatter(0, best[None], 1.0)
        return torch.softmax(logits[best], dim=-1), attention

    def tile_scores(self, bag: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(bag), dim=-1)

    def loss(self, bag: torch.Tensor, label: int) -> torch.Tensor:
        probs, _ = self(bag)
        return F.nll_loss(torch.log(probs.clamp_min(1e-8))[None], torch.tensor([label], device=bag.device))


class MultiTaskDE(_AttentionBackbone):
    """Per gene: log2FC (regression) and down/unchanged/up (classification), from one attention-pooled vector."""

    def __init__(self, in_dim: int, n_genes: int, **kw) -> None:
        super().__init__(in_dim, **kw)
        hidden = self.fc[0].out_features
        self.regression = nn.Linear(hidden, n_genes)
        self.classification = nn.Linear(hidden, n_genes * N_DE_CLASSES)
        self.n_genes = n_genes

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bag (n, in_dim) -> (per gene [log2FC, p_down, p_unchanged, p_up] as (n_genes, 4), attention (n,))."""
        _, a, v = self.pool(bag)
        return self._heads(v), a

    def _heads(self, v: torch.Tensor) -> torch.Tensor:
        fc = self.regression(v)
        probs = torch.softmax(self.classification(v).view(self.n_genes, N_DE_CLASSES), dim=-1)
        return torch.cat([fc[:, None], probs], dim=1)

    def tile_scores(self, bag: torch.Tensor) -> torch.Tensor:
        """Gene-specific tile scores: each tile's predicted log2FC on its own (n, n_genes)."""
        return self.regression(self.fc(bag))

    def loss(self, bag: torch.Tensor, log2fc: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """``log2fc`` (n_genes,) with NaN where unknown; ``classes`` (n_genes,) with -1 where the gene is not
        classified (excluded by the label gate)."""
        out, _ = self(bag)
        known = ~torch.isnan(log2fc)
        reg = F.mse_loss(out[known, 0], log2fc[known]) if known.any() else out.sum() * 0
        used = classes >= 0
        cls = F.nll_loss(torch.log(out[used, 1:].clamp_min(1e-8)), classes[used]) if used.any() else out.sum() * 0
        return reg + cls


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """The Cox negative log partial likelihood with Breslow's ties, averaged over the events:
    -(1/D) sum over events i of (risk_i - log sum_{j: T_j >= T_i} exp(risk_j)); risk, time, event (n,). Every
    subject tied with an event's time is in its risk set (Breslow). Without an event the loss is 0 (with a
    gradient of 0), so a batch of censored bags leaves the model as it is."""
    if risk.shape != time.shape or risk.shape != event.shape or risk.ndim != 1:
        raise ValueError(f"risk, time and event must be (n,), got {tuple(risk.shape)}, {tuple(time.shape)}, "
                         f"{tuple(event.shape)}")
    died = event > 0
    if not bool(died.any()):
        return risk.sum() * 0
    at_risk = time[None, :] >= time[died][:, None]  # (events, n)
    log_sums = torch.logsumexp(risk[None, :].masked_fill(~at_risk, float("-inf")), dim=1)
    return -(risk[died] - log_sums).mean()


class SurvivalAttention(_AttentionBackbone):
    """Gated-attention MIL over the tiles and one log-risk from the attention-pooled slide vector (a Cox model on
    it); ``tile_scores``: each tile's log-risk as a bag of one."""

    def __init__(self, in_dim: int, **kw) -> None:
        super().__init__(in_dim, **kw)
        self.risk = nn.Linear(self.fc[0].out_features, 1)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bag (n, in_dim) -> (log-risk (1,), attention (n,))."""
        _, a, v = self.pool(bag)
        return self.risk(v), a

    def tile_scores(self, bag: torch.Tensor) -> torch.Tensor:
        return self.risk(self.fc(bag))


class WithRiskReference(nn.Module):
    """A survival head with its training bags' median log-risk: forward -> ([log-risk, median], attention), so a
    slide's high/low call against the training median travels with the exported model."""

    def __init__(self, head: nn.Module, median: float) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("median", torch.tensor([float(median)], dtype=torch.float32))

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        risk, attention = self.head(bag)
        return torch.cat([risk.reshape(1), self.median]), attention

    def tile_scores(self, bag: torch.Tensor) -> torch.Tensor:
        return self.head.tile_scores(bag)


class WithTileScores(nn.Module):
    """The exported form of a head: bag -> (outputs, attention, per-tile scores)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, attention = self.head(bag)
        return out, attention, self.head.tile_scores(bag)
