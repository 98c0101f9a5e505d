"""Contrastive losses against hand-written references, and the behaviour of queues and adversarial banks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from histcode.config import PretrainConfig
from histcode.ssl.encoders import Encoder
from histcode.ssl.losses import adco_bank_gradient, info_nce, nt_xent
from histcode.ssl.methods import AdCo, MoCo


def ref_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """Loop form of SimCLR's loss: anchor a, positive its partner, denominator every other view."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2]).double()]
    n = z1.shape[0]
    total = 0.0
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        sims = {b: float(z[a] @ z[b]) / t for b in range(2 * n) if b != a}
        total += -math.log(math.exp(sims[pos]) / sum(math.exp(s) for s in sims.values()))
    return total / (2 * n)


def ref_info_nce(q: torch.Tensor, k: torch.Tensor, neg: torch.Tensor, t: float) -> float:
    q, k, neg = (F.normalize(x.double(), dim=1) for x in (q, k, neg))
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / t)
        negs = sum(math.exp(float(q[i] @ m) / t) for m in neg)
        total += -math.log(pos / (pos + negs))
    return total / q.shape[0]


@pytest.mark.parametrize("n", [2, 5, 8])
@pytest.mark.parametrize("d", [3, 16])
@pytest.mark.parametrize("t", [0.07, 0.5, 1.0])
def test_nt_xent_matches_reference(n: int, d: int, t: float) -> None:
    g = torch.Generator().manual_seed(n * 100 + d)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    assert float(nt_xent(z1, z2, t)) == pytest.approx(ref_nt_xent(z1, z2, t), rel=1e-5)


@pytest.mark.parametrize("n", [1, 4, 7])
@pytest.mark.parametrize("d", [4, 32])
@pytest.mark.parametrize("t", [0.02, 0.12, 0.2])
def test_info_nce_matches_reference(n: int, d: int, t: float) -> None:
    g = torch.Generator().manual_seed(n * 10 + d)
    q, k, neg = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.randn(11, d, generator=g)
    assert float(info_nce(q, k, neg, t)) == pytest.approx(ref_info_nce(q, k, neg, t), rel=1e-5)


def test_perfect_alignment_gives_low_loss() -> None:
    z = torch.eye(4) * 10
    assert float(nt_xent(z, z, 0.1)) < 1e-3


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: nt_xent(torch.randn(4, 3), torch.randn(4, 5), 0.1), "shapes differ"),
        (lambda: nt_xent(torch.randn(1, 3), torch.randn(1, 3), 0.1), "at least 2"),
        (lambda: nt_xent(torch.randn(4), torch.randn(4), 0.1), "2-D"),
        (lambda: info_nce(torch.randn(2, 3), torch.randn(2, 3), torch.randn(5, 4), 0.1), r"negatives must be \(K, 3\)"),
        (lambda: info_nce(torch.randn(2, 3), torch.randn(2, 3), torch.randn(5, 3), 0.0), "temperature must be positive"),
    ],
)
def test_losses_validate_their_arguments(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def official_adco_gradient(q: torch.Tensor, k: torch.Tensor, bank: torch.Tensor, t: float) -> torch.Tensor:
    """The memory-bank gradient as the AdCo authors compute it analytically (W is D x K there), negated back
    into d(loss)/d(bank) and transposed to our (K, D) layout."""
    q, k = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    w = bank.double().t()  # (D, K)
    d_norm = w / w.norm(dim=0)
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ d_norm
    p_qd = torch.softmax(torch.cat([l_pos, l_neg], dim=1) / t, dim=1)[:, 1:]
    g = q.t() @ p_qd / q.shape[0] - (p_qd * l_neg).mean(dim=0) * d_norm
    g = -g / w.norm(dim=0) / t  # the authors' g, which is -dL/dW
    return (-g).t()


@pytest.mark.parametrize("t", [0.02, 0.1])
def test_adco_bank_gradient_equals_the_authors_formula(t: float) -> None:
    g = torch.Generator().manual_seed(3)
    q, k, bank = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(20, 8, generator=g) * 3
    ours = adco_bank_gradient(q, k, bank, t).double()
    torch.testing.assert_close(ours, official_adco_gradient(q, k, bank, t), rtol=1e-4, atol=1e-6)


def _tiny_encoder() -> Encoder:
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return Encoder(backbone, 4, "tiny")


def test_adco_bank_climbs_the_loss() -> None:
    cfg = PretrainConfig(method="adco", bank_size=16, proj_dim=8, bank_lr=0.5, bank_momentum=0.0, bank_weight_decay=0.0)
    method = AdCo(_tiny_encoder(), cfg)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    method.init_bank(torch.randn(16, 8, generator=g))
    losses = [float(info_nce(q, k, method.bank, cfg.bank_temperature))]
    for _ in range(5):
        method.bank_step(q, k)
        losses.append(float(info_nce(q, k, method.bank, cfg.bank_temperature)))
    assert all(b > a for a, b in zip(losses, losses[1:])), losses
    # and the encoder-side loss (at the training temperature) rises too: the bank became harder negatives
    assert float(info_nce(q, k, method.bank, 0.12)) > float(info_nce(q, k, F.normalize(torch.randn(16, 8, generator=g)), 0.12))


def test_adco_step_trains_encoder_and_bank_together() -> None:
    cfg = PretrainConfig(method="adco", bank_size=16, proj_dim=8)
    method = AdCo(_tiny_encoder(), cfg)
    x1, x2 = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)
    bank_before = method.bank.clone()
    loss = method(x1, x2)
    loss.backward()
    assert method.encoder.backbone[0].weight.grad is not None
    assert all(p.grad is None for p in method.key_encoder.parameters())  # keys never get gradients
    method.after_step()
    assert not torch.equal(method.bank, bank_before)


def test_moco_queue_is_fifo() -> None:
    cfg = PretrainConfig(method="moco", queue_size=5, proj_dim=8)
    method = MoCo(_tiny_encoder(), cfg)
    for step in range(3):
        method(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16))
        keys = method._pairs[0][1].clone()
        method.after_step()
        ptr = (2 * step) % 5
        rows = [(ptr + i) % 5 for i in range(2)]
        torch.testing.assert_close(method.queue[rows], keys)
    assert int(method.queue_ptr) == 6 % 5


def test_momentum_update_moves_keys_towards_queries() -> None:
    cfg = PretrainConfig(method="moco", queue_size=8, proj_dim=8, key_momentum=0.5)
    method = MoCo(_tiny_encoder(), cfg)
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.key_encoder.parameters()]
    method.momentum_update()
    for b, pk, p in zip(before, method.key_encoder.parameters(), method.encoder.parameters()):
        torch.testing.assert_close(pk, 0.5 * b + 0.5 * p)
