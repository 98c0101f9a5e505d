"""Contrastive losses: NT-Xent (SimCLR), InfoNCE against a queue (MoCo v2) and against a learnable bank of
adversarial negatives (AdCo). Each validates its inputs and states tensor shapes.

Shapes: N batch, D embedding dimension, K queue or bank size. Embeddings are L2-normalised inside the losses
(the caller need not), and every loss is a mean over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"{names}: expected 2-D (N, D) tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{names}: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.shape[0] < 1:
        raise ValueError(f"{names}: empty batch")


def _check_temperature(t: float, name: str = "temperature") -> None:
    if not t > 0:
        raise ValueError(f"{name} must be positive, got {t}")


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy over 2N views.

    z1, z2: (N, D), row i of z1 and of z2 are two views of sample i. Each of the 2N views has its partner as the
    positive and the other 2N - 2 views as negatives.
    """
    _check_pair(z1, z2, "nt_xent")
    _check_temperature(temperature)
    n = z1.shape[0]
    if n < 2:
        raise ValueError("nt_xent needs at least 2 samples (otherwise there are no negatives)")
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2N, D)
    logits = z @ z.t() / temperature  # (2N, 2N)
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits.float(), targets)


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of queries against their keys and a shared set of negatives (MoCo's queue, AdCo's bank).

    q, k: (N, D); negatives: (K, D). Keys and negatives are used as given (MoCo detaches keys; AdCo's bank
    gets its own gradient), all three are L2-normalised here.
    """
    _check_pair(q, k, "info_nce")
    _check_temperature(temperature)
    if negatives.ndim != 2 or negatives.shape[1] != q.shape[1]:
        raise ValueError(f"info_nce: negatives must be (K, {q.shape[1]}), got {tuple(negatives.shape)}")
    q, k, negatives = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(negatives, dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    negative = q @ negatives.t()  # (N, K)
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits.float(), torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def adco_bank_gradient(q: torch.Tensor, k: torch.Tensor, bank: torch.Tensor, bank_temperature: float) -> torch.Tensor:
    """d(loss)/d(bank) of AdCo's adversarial negatives: the InfoNCE loss at the bank's own temperature, taken
    with respect to the raw (unnormalised) bank. The bank then moves UP this gradient (it is the adversary).

    q, k: (N, D) (no gradient flows back to them here); bank: (K, D). Returns (K, D).
    """
    _check_temperature(bank_temperature, "bank_temperature")
    with torch.enable_grad():  # callers run under no_grad
        bank = bank.detach().float().requires_grad_(True)
        loss = info_nce(q.detach().float(), k.detach().float(), bank, bank_temperature)
        (grad,) = torch.autograd.grad(loss, bank)
    return grad
