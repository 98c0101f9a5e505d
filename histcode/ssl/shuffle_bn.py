"""Shuffle-BN (He et al., MoCo, 2020): the key encoder must not see its queries' batch statistics, or the
positive pair is matched through them (a shortcut that lowers the loss and teaches nothing).

- Across processes (torchrun): the key batch is shuffled across processes before the key encoder and put back
  after it, as MoCo's and AdCo's official code do; each process's batch norm then normalises keys with the
  statistics of another mix of samples than its queries'.
- On one device: batch norm layers compute their training statistics over ``splits`` sub-batches
  (``SplitBatchNorm``, as single-GPU MoCo reproductions do) and the key batch is shuffled before the key
  encoder, so a key's statistics come from other samples than its query's.

In evaluation (the exported encoder) a ``SplitBatchNorm`` is an ordinary batch norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histcode.ssl import distributed as dist_util


MIN_SAMPLES = 4  # per sub-batch


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of ``splits`` sub-batches (samples i, i + s, i + 2s,
    ... form sub-batch i); the running statistics are the sub-batches' mean. Same parameters and buffers as
    BatchNorm2d, so checkpoints and exports are unchanged."""

    def __init__(self, num_features: int, splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.splits = splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # before anything reads the batch size: an export stays batch-size free
            return super().forward(x)
        n, c, h, w = x.shape
        # a batch the configured splits do not divide takes fewer; a sub-batch holds MIN_SAMPLES at least (with
        # one or two samples batch norm's statistics are degenerate and its gradients blow up)
        s = largest_split(n, min(self.splits, n // MIN_SAMPLES))
        if not self.training or s <= 1:
            return super().forward(x)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        out = F.batch_norm(x.reshape(n // s, c * s, h, w), mean, var, self.weight.repeat(s), self.bias.repeat(s),
                           True, self.momentum if self.momentum is not None else 0.1, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(s, c).mean(dim=0))
            self.running_var.copy_(var.view(s, c).mean(dim=0))
        return out.view(n, c, h, w)


def split_batch_norms(module: nn.Module, splits: int) -> nn.Module:
    """Replace every BatchNorm2d below ``module`` by a SplitBatchNorm with the same state (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm):
            split = SplitBatchNorm(child.num_features, splits, eps=child.eps, momentum=child.momentum,
                                   affine=child.affine, track_running_stats=child.track_running_stats)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split.to(child.running_mean.device if child.running_mean is not None else "cpu"))
        else:
            split_batch_norms(child, splits)
    return module


def largest_split(batch: int, wanted: int) -> int:
    """The most sub-batches, at most ``wanted`` (and at least 1), that divide ``batch`` evenly."""
    return max(s for s in range(1, max(1, wanted) + 1) if batch % s == 0)


@torch.no_grad()
def shuffled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a shuffled batch, the permutation that undoes it). Across processes: the global batch is shuffled
    (the permutation is drawn on process 0 and broadcast) and each process gets its slice; on one device: a
    permutation of the local batch."""
    if not dist_util.is_distributed():
        idx = torch.randperm(x.shape[0], device=x.device)
        return x[idx], torch.argsort(idx)
    import torch.distributed as dist

    everything = dist_util.gather_no_grad(x)
    idx = torch.randperm(everything.shape[0], device=x.device)
    dist.broadcast(idx, src=0)
    mine = idx.view(dist_util.world_size(), -1)[dist_util.rank()]
    return everything[mine], torch.argsort(idx)


@torch.no_grad()
def unshuffled(y: torch.Tensor, undo: torch.Tensor) -> torch.Tensor:
    """Put a shuffled batch's outputs back in the original order (this process's share of it)."""
    if not dist_util.is_distributed():
        return y[undo]
    everything = dist_util.gather_no_grad(y)
    return everything[undo.view(dist_util.world_size(), -1)[dist_util.rank()]]
