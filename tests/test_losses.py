"""Contrastive losses against hand-written references, and the behaviour of queues and adversarial banks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from histcode.config import PretrainConfig
from histcode.ssl.encoders import Encoder
from histcode.ssl.losses import adco_bank_gradient, adco_loss, info_nce, nt_xent
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


def authors_adco_step(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, moco_t: float, mem_t: float):
    """AdCo's ``update_network`` transcribed from the authors' code (maple-research-lab/AdCo,
    training/train.py) for one process: W is their (D, K) bank, q and k the normalised queries and keys.
    Returns (the encoder loss, their bank gradient g, which is -d(loss at mem_t)/dW)."""
    l_pos = torch.einsum("nc,ck->nk", [q, k.T])  # every query against every key of the batch
    d_norm = F.normalize(w, dim=0)
    l_neg = torch.einsum("nc,ck->nk", [q, d_norm])
    logits = torch.cat([l_pos, l_neg], dim=1) / moco_t
    labels = torch.arange(0, q.shape[0], dtype=torch.long)
    loss = F.cross_entropy(logits, labels)
    cluster = w.shape[1]
    logits = torch.cat([l_pos, l_neg], dim=1) / mem_t
    total_bsize = logits.shape[1] - cluster
    p_qd = torch.softmax(logits, dim=1)[:, total_bsize:]
    g = torch.einsum("cn,nk->ck", [q.T, p_qd]) / logits.shape[0] - torch.mul(torch.mean(torch.mul(p_qd, l_neg), dim=0), d_norm)
    g = -torch.div(g, torch.norm(w, dim=0)) / mem_t
    return loss, g


def test_adco_loss_by_hand() -> None:
    """Two queries, two keys, one bank entry, in 2-D: the loss written out with exp and log."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    bank = torch.tensor([[2.0, 0.0]])  # normalised to (1, 0)
    t = 0.5
    # query 0: positive key 0 (0.6), other key 1 (0.0), bank (1.0); query 1: positive key 1 (1.0), key 0 (0.8), bank (0.0)
    l0 = -math.log(math.exp(0.6 / t) / (math.exp(0.6 / t) + math.exp(0.0 / t) + math.exp(1.0 / t)))
    l1 = -math.log(math.exp(1.0 / t) / (math.exp(1.0 / t) + math.exp(0.8 / t) + math.exp(0.0 / t)))
    assert float(adco_loss(q, k, bank, t)) == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # the other keys are negatives: without them (MoCo's form) the loss is lower
    assert float(info_nce(q, k, bank, t)) < float(adco_loss(q, k, bank, t))


@pytest.mark.parametrize("t", [0.02, 0.1])
def test_adco_loss_and_bank_gradient_equal_the_authors_update(t: float) -> None:
    g = torch.Generator().manual_seed(3)
    q, k = F.normalize(torch.randn(6, 8, generator=g), dim=1), F.normalize(torch.randn(6, 8, generator=g), dim=1)
    bank = torch.randn(20, 8, generator=g) * 3  # ours is (K, D), the authors' W is (D, K)
    loss, theirs = authors_adco_step(q.double(), k.double(), bank.double().t(), 0.12, t)
    assert float(adco_loss(q, k, bank, 0.12)) == pytest.approx(float(loss), rel=1e-5)
    ours = adco_bank_gradient(q, k, bank, t).double()
    torch.testing.assert_close(ours, (-theirs).t(), rtol=1e-4, atol=1e-6)  # theirs is the negative gradient


def test_adco_loss_takes_this_process_rows_of_the_gathered_keys() -> None:
    g = torch.Generator().manual_seed(5)
    q, keys, bank = torch.randn(3, 4, generator=g), torch.randn(9, 4, generator=g), torch.randn(5, 4, generator=g)
    # process 1 of 3: its queries' positives are keys 3..5; the others are negatives
    qn, kn, bn = (F.normalize(x.double(), dim=1) for x in (q, keys, bank))
    logits = torch.cat([qn @ kn.T, qn @ bn.T], dim=1) / 0.2
    expected = F.cross_entropy(logits, torch.tensor([3, 4, 5]))
    assert float(adco_loss(q, keys, bank, 0.2, offset=3)) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="no keys"):
        adco_loss(q, keys, bank, 0.2, offset=7)


def _tiny_encoder() -> Encoder:
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return Encoder(backbone, 4, "tiny")


def test_adco_bank_climbs_the_loss() -> None:
    cfg = PretrainConfig(method="adco", bank_size=16, proj_dim=8, bank_lr=0.5, bank_momentum=0.0, bank_weight_decay=0.0)
    method = AdCo(_tiny_encoder(), cfg)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    method.init_bank(torch.randn(16, 8, generator=g))
    losses = [float(adco_loss(q, k, method.bank, cfg.bank_temperature))]
    for _ in range(5):
        method.bank_step(method.bank_gradient([(q, k)]))
        losses.append(float(adco_loss(q, k, method.bank, cfg.bank_temperature)))
    assert all(b > a for a, b in zip(losses, losses[1:])), losses
    # and the encoder-side loss (at the training temperature) rises too: the bank became harder negatives
    assert float(adco_loss(q, k, method.bank, 0.12)) > float(adco_loss(q, k, F.normalize(torch.randn(16, 8, generator=g)), 0.12))


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


def _bn_encoder() -> Encoder:
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return Encoder(backbone, 6, "tiny-bn")


@pytest.mark.parametrize("method_cls", [MoCo, AdCo])
def test_keys_do_not_see_their_queries_batch_statistics(method_cls) -> None:
    """The shortcut shuffle-BN closes: with the key encoder equal to the query encoder and the same images as
    both views, plain batch norm gives every key exactly its query (the positive is found through the batch's
    statistics); with shuffle-BN the key's statistics come from other samples, so keys differ from queries
    in training but not in evaluation (the shuffle is undone exactly)."""
    torch.manual_seed(0)
    x = torch.rand(16, 3, 12, 12) * torch.arange(1, 17).view(16, 1, 1, 1) ** 2  # samples far apart in scale
    for shuffle in (False, True):
        cfg = PretrainConfig(method=method_cls.name, batch_size=16, bn_splits=4, shuffle_bn=shuffle, queue_size=32,
                             bank_size=16, proj_dim=8)
        method = method_cls(_bn_encoder(), cfg).train()
        with torch.no_grad():
            q, k = method.embed(x), method.keys(x)
        cos = (q * k).sum(dim=1)
        if shuffle:  # a sub-batch that a shuffle happens to rebuild keeps its statistics; most do not
            assert int((cos < 1 - 1e-5).sum()) >= 12, cos
        else:
            torch.testing.assert_close(cos, torch.ones(16))
    method.copy_to_keys()  # (the two encoders' running statistics moved apart in training)
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(method.embed(x), method.keys(x))  # the shuffle itself is a permutation undone


def test_split_batch_norm_is_batch_norm_of_each_sub_batch() -> None:
    from histcode.ssl.shuffle_bn import SplitBatchNorm

    torch.manual_seed(1)
    x = torch.randn(12, 2, 3, 3)
    split = SplitBatchNorm(2, splits=3).train()
    out = split(x)
    for i in range(3):  # sub-batch i holds samples i, i + 3, i + 6, i + 9
        part = x[i::3]
        ref = (part - part.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(part.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
        torch.testing.assert_close(out[i::3], ref, rtol=1e-4, atol=1e-5)
    split.eval()
    torch.testing.assert_close(split(x), torch.nn.functional.batch_norm(x, split.running_mean, split.running_var, split.weight, split.bias))


def test_adco_bank_is_filled_as_the_authors_do(tmp_path) -> None:
    """The authors' init_memory: the encoder trains while its keys fill the bank; then keys = queries' encoder."""
    from histcode.ssl.augment import TwoViews
    from histcode.ssl.train import Trainer

    class Tiles(torch.utils.data.Dataset):
        def __len__(self):
            return 24

        def __getitem__(self, i):
            return (torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i)) * 255).to(torch.uint8)

    cfg = PretrainConfig(method="adco", batch_size=4, bank_size=10, proj_dim=8, image_px=16, num_workers=0, max_steps=1)
    method = AdCo(_bn_encoder(), cfg)
    before = [p.clone() for p in method.encoder.parameters()]
    trainer = Trainer(method, TwoViews(cfg.augment, 16), Tiles(), cfg, torch.device("cpu"), 1, tmp_path / "c.pt")
    method.train()
    trainer.init_bank()
    assert bool(method.bank_ready)
    torch.testing.assert_close(method.bank.norm(dim=1), torch.ones(10))
    assert any(not torch.equal(a, b) for a, b in zip(before, method.encoder.parameters()))  # it trained
    for p, pk in zip(method.encoder.parameters(), method.key_encoder.parameters()):
        assert torch.equal(p, pk)  # and the key encoder starts as a copy of it
