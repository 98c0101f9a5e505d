"""SimCLR, MoCo v2 and AdCo behind one interface.

    loss = method(view1, view2)   # forward: the encoder-side loss of one batch
    loss.backward(); optimizer.step()
    method.after_step()           # momentum encoder, queue or adversarial bank updates

Every method owns its encoder (``method.encoder``, the part that is exported) and a projection head; MoCo and
AdCo add a momentum key encoder. Queues and banks are buffers, so they are part of ``state_dict`` and of every
checkpoint. Under torchrun, negatives and bank updates use all processes' samples.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from histcode.config import PretrainConfig
from histcode.ssl import distributed as dist_util
from histcode.ssl.distributed import gather_no_grad, gather_with_grad
from histcode.ssl.encoders import Encoder
from histcode.ssl.losses import adco_bank_gradient, adco_loss, info_nce, nt_xent
from histcode.ssl.schedule import for_data
from histcode.ssl.shuffle_bn import largest_split, shuffled, split_batch_norms, unshuffled


def projection_head(dim: int, hidden: int, out: int, batch_norm: bool) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(dim, hidden)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden, out)]
    return nn.Sequential(*layers)


class ContrastiveMethod(nn.Module):
    name = "base"

    def __init__(self, encoder: Encoder, cfg: PretrainConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.temperature = cfg.method_temperature()
        self.symmetric = cfg.symmetric

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Projected, L2-normalised embedding of the query branch: (N, 3, H, W) -> (N, proj_dim)."""
        return F.normalize(self.head(self.encoder(x)), dim=1)

    @torch.no_grad()
    def after_step(self) -> None:
        """Updates that follow an optimizer step (none for SimCLR)."""


class SimCLR(ContrastiveMethod):
    name = "simclr"

    def __init__(self, encoder: Encoder, cfg: PretrainConfig) -> None:
        super().__init__(encoder, cfg)
        self.head = projection_head(encoder.dim, encoder.dim, cfg.proj_dim, batch_norm=True)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return nt_xent(gather_with_grad(self.embed(x1)), gather_with_grad(self.embed(x2)), self.temperature)


class _MomentumMethod(ContrastiveMethod):
    """Shared by MoCo and AdCo: a momentum copy of encoder and head that produces the keys, with shuffle-BN
    (``histcode.ssl.shuffle_bn``): keys are computed on a shuffled batch, across processes under torchrun, over
    ``bn_splits`` sub-batches of batch norm on one device."""

    def __init__(self, encoder: Encoder, cfg: PretrainConfig) -> None:
        super().__init__(encoder, cfg)
        self.head = projection_head(encoder.dim, encoder.dim, cfg.proj_dim, batch_norm=False)
        self.shuffle_bn = cfg.shuffle_bn
        if cfg.shuffle_bn and dist_util.world_size() == 1:
            split_batch_norms(self.encoder, largest_split(cfg.batch_size, cfg.bn_splits))
        self.key_encoder = copy.deepcopy(self.encoder)
        self.key_head = copy.deepcopy(self.head)
        for p in (*self.key_encoder.parameters(), *self.key_head.parameters()):
            p.requires_grad_(False)
        self.m = cfg.key_momentum  # the trainer sets it for each step (histcode.ssl.schedule.key_momentum)
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def momentum_update(self) -> None:
        for online, key in ((self.encoder, self.key_encoder), (self.head, self.key_head)):
            for p, pk in zip(online.parameters(), key.parameters()):
                pk.mul_(self.m).add_(p.detach(), alpha=1 - self.m)
            for b, bk in zip(online.buffers(), key.buffers()):
                bk.copy_(b)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised keys of ``x`` (N, D), in ``x``'s order, computed on the shuffled batch."""
        if not self.shuffle_bn:
            return F.normalize(self.key_head(self.key_encoder(x)), dim=1)
        mixed, undo = shuffled(x)
        return unshuffled(F.normalize(self.key_head(self.key_encoder(mixed)), dim=1), undo)

    @torch.no_grad()
    def copy_to_keys(self) -> None:
        """The key encoder and head become copies of the online ones."""
        self.key_encoder.load_state_dict(self.encoder.state_dict())
        self.key_head.load_state_dict(self.head.state_dict())

    def negatives(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        self.momentum_update()
        views = [(x1, x2), (x2, x1)] if self.symmetric else [(x1, x2)]
        self._pairs = []
        losses = []
        for xq, xk in views:
            q, k = self.embed(xq), self.keys(xk)
            losses.append(info_nce(q, k, self.negatives(), self.temperature))
            self._pairs.append((q.detach(), k))
        return sum(losses) / len(losses)


class MoCo(_MomentumMethod):
    """MoCo v2: negatives from a FIFO queue of past keys. The queue is filled with keys of the (untrained) key
    encoder before the first step (``init_queue``, which the trainer calls), not left at random vectors that a
    short run would spend its first queue_size / batch steps contrasting against."""

    name = "moco"

    def __init__(self, encoder: Encoder, cfg: PretrainConfig) -> None:
        super().__init__(encoder, cfg)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_ready", torch.zeros((), dtype=torch.bool))

    def negatives(self) -> torch.Tensor:
        return self.queue.clone().detach()

    @torch.no_grad()
    def init_queue(self, keys: torch.Tensor) -> None:
        """Fill the queue with key embeddings (K, D)."""
        if keys.shape != self.queue.shape:
            raise ValueError(f"init_queue: need {tuple(self.queue.shape)} keys, got {tuple(keys.shape)}")
        self.queue.copy_(F.normalize(keys, dim=1))
        self.queue_ptr.zero_()
        self.queue_ready.fill_(True)

    @torch.no_grad()
    def after_step(self) -> None:
        for _, k in self._pairs:
            size = self.queue.shape[0]
            keys = gather_no_grad(k)[-size:]
            idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
            self.queue[idx] = keys.to(self.queue.dtype)
            self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)
        self._pairs = []


class AdCo(_MomentumMethod):
    """AdCo (Hu et al. 2021) as its authors train it: each query is contrasted with every key of the (gathered)
    batch and with a learnable bank of negatives (``adco_loss``); the encoder minimises that loss, the bank
    takes an SGD-with-momentum step UP it (at its own temperature, with its own learning rate, momentum and
    weight decay). Symmetric (``pretrain.symmetric``, the authors' ``--sym``): both views are queries of the
    online encoder against the other view's keys, the two losses and the two bank gradients averaged."""

    name = "adco"

    def __init__(self, encoder: Encoder, cfg: PretrainConfig) -> None:
        super().__init__(encoder, cfg)
        self.register_buffer("bank", F.normalize(torch.randn(cfg.bank_size, cfg.proj_dim), dim=1))
        self.register_buffer("bank_velocity", torch.zeros(cfg.bank_size, cfg.proj_dim))
        self.register_buffer("bank_ready", torch.zeros((), dtype=torch.bool))
        self.bank_temperature = cfg.bank_temperature
        self.bank_lr = cfg.bank_lr
        self.bank_momentum = cfg.bank_momentum
        self.bank_weight_decay = cfg.bank_weight_decay

    def negatives(self) -> torch.Tensor:
        return self.bank.detach()

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        self.momentum_update()
        offset = dist_util.rank() * x1.shape[0]  # this process's rows among the gathered keys
        views = [(x1, x2), (x2, x1)] if self.symmetric else [(x1, x2)]
        self._pairs, losses = [], []
        for xq, xk in views:
            q, keys = self.embed(xq), gather_no_grad(self.keys(xk))
            losses.append(adco_loss(q, keys, self.negatives(), self.temperature, offset))
            self._pairs.append((q.detach(), keys))
        return sum(losses) / len(losses)

    @torch.no_grad()
    def init_bank(self, keys: torch.Tensor) -> None:
        """Fill the bank with key embeddings (K, D)."""
        if keys.shape != self.bank.shape:
            raise ValueError(f"init_bank: need {tuple(self.bank.shape)} keys, got {tuple(keys.shape)}")
        self.bank.copy_(F.normalize(keys, dim=1))
        self.bank_velocity.zero_()
        self.bank_ready.fill_(True)

    def bank_gradient(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """d(loss)/d(bank) at the bank temperature, averaged over the pairs (queries of every process, so the
        mean over the global batch, as the authors' all-reduce gives)."""
        grads = [adco_bank_gradient(gather_no_grad(q), keys, self.bank, self.bank_temperature) for q, keys in pairs]
        return sum(grads) / len(grads)

    @torch.no_grad()
    def bank_step(self, grad: torch.Tensor) -> None:
        # v <- m v - dL/dW + wd W ;  W <- W - lr v   (so W climbs the loss; weight decay pulls it in)
        self.bank_velocity.mul_(self.bank_momentum).sub_(grad.to(self.bank.dtype)).add_(self.bank, alpha=self.bank_weight_decay)
        self.bank.sub_(self.bank_velocity, alpha=self.bank_lr)

    @torch.no_grad()
    def after_step(self) -> None:
        if self._pairs:
            self.bank_step(self.bank_gradient(self._pairs))
        self._pairs = []


METHODS: dict[str, type[ContrastiveMethod]] = {"simclr": SimCLR, "moco": MoCo, "adco": AdCo}


def build_method(encoder: Encoder, cfg: PretrainConfig, n_tiles: int | None = None) -> ContrastiveMethod:
    """The method of ``cfg.method``; with ``n_tiles`` (the training tiles) its queue or bank is bounded by
    ``pretrain.negatives_fraction`` of them (``histcode.ssl.schedule``)."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; available: {sorted(METHODS)}")
    return METHODS[cfg.method](encoder, for_data(cfg, n_tiles))
