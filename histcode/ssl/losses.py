"""Contrastive losses: NT-Xent (SimCLR), InfoNCE against a queue (MoCo v2), and AdCo's loss against the
batch's keys and a learnable bank of adversarial negatives. Each validates its inputs and states tensor shapes.

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


def adco_loss(q: torch.Tensor, keys: torch.Tensor, bank: torch.Tensor, temperature: float,
              offset: int = 0) -> torch.Tensor:
    """AdCo's loss (Hu et al. 2021, as their ``update_network`` computes it): each query against every key of the
    (gathered) batch and every entry of the adversarial bank. Query i's positive is key ``offset + i`` (its own
    view; ``offset`` is this process's first row in the gathered keys), and the batch's other keys are negatives
    as well as the bank's entries.

    q: (N, D); keys: (M, D) with M >= offset + N; bank: (K, D). All are L2-normalised here.
    """
    if q.ndim != 2 or keys.ndim != 2 or bank.ndim != 2:
        raise ValueError(f"adco_loss: expected 2-D tensors, got {tuple(q.shape)}, {tuple(keys.shape)}, {tuple(bank.shape)}")
    if not q.shape[1] == keys.shape[1] == bank.shape[1]:
        raise ValueError(f"adco_loss: dimensions differ: {q.shape[1]}, {keys.shape[1]}, {bank.shape[1]}")
    if offset < 0 or offset + q.shape[0] > keys.shape[0]:
        raise ValueError(f"adco_loss: queries {offset}..{offset + q.shape[0]} have no keys among {keys.shape[0]}")
    _check_temperature(temperature)
    q, keys, bank = F.normalize(q, dim=1), F.normalize(keys, dim=1), F.normalize(bank, dim=1)
    logits = torch.cat([q @ keys.t(), q @ bank.t()], dim=1) / temperature  # (N, M + K)
    labels = torch.arange(offset, offset + q.shape[0], device=q.device)
    return F.cross_entropy(logits.float(), labels)


def adco_bank_gradient(q: torch.Tensor, keys: torch.Tensor, bank: torch.Tensor, bank_temperature: float,
                       offset: int = 0) -> torch.Tensor:
    """d(loss)/d(bank) of AdCo's adversarial negatives: ``adco_loss`` (in-batch keys included) at the bank's
    own temperature, taken with respect to the raw (unnormalised) bank. The bank then moves UP this gradient
    (it is the adversary).

    q: (N, D); keys: (M, D) (no gradient flows back to either); bank: (K, D). Returns (K, D).
    """
    _check_temperature(bank_temperature, "bank_temperature")
    with torch.enable_grad():  # callers run under no_grad
        bank = bank.detach().float().requires_grad_(True)
        loss = adco_loss(q.detach().float(), keys.detach().float(), bank, bank_temperature, offset)
        (grad,) = torch.autograd.grad(loss, bank)
    return grad
