"""Settings that follow the length of a run and the size of its data, as the methods' authors scale them.

- Key momentum (MoCo, AdCo): a momentum of 0.999 moves the key encoder by 5% over 54 steps; the key encoder of
  a short run would stay at its initialisation. With ``key_momentum_schedule: cosine`` the momentum rises from
  ``key_momentum`` at the first step to 1 at the last (BYOL, Grill et al. 2020):
  m_t = 1 - (1 - m_0) (cos(pi t / T) + 1) / 2.
- Negatives (MoCo's queue, AdCo's bank): at most ``negatives_fraction`` of the training tiles, in whole batches
  and at least one batch. A queue larger than the data holds older keys of the query's own tile, which it is
  then taught to push away; the paper's 65,536 negatives are 5% of ImageNet.
- Learning rate: ``PretrainConfig.learning_rate`` (the linear scaling rule: the method's base rate at batch 256
  times batch / 256).
"""

from __future__ import annotations

import logging
import math

from histcode.config import PretrainConfig

log = logging.getLogger(__name__)


def key_momentum(cfg: PretrainConfig, step: int, total: int) -> float:
    """The key encoder's momentum at ``step`` (0-based) of ``total`` steps."""
    if cfg.key_momentum_schedule == "constant" or total <= 1:
        return cfg.key_momentum
    progress = min(1.0, max(0.0, step / (total - 1)))
    return 1.0 - (1.0 - cfg.key_momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0


def bounded_negatives(size: int, cfg: PretrainConfig, n_tiles: int | None) -> int:
    """``size`` (queue_size or bank_size) limited to ``negatives_fraction`` of ``n_tiles``, in whole batches, at
    least one batch; unchanged when the number of tiles is not known."""
    if not n_tiles:
        return size
    cap = int(cfg.negatives_fraction * n_tiles) // cfg.batch_size * cfg.batch_size
    bounded = min(size, max(cfg.batch_size, cap))
    if bounded < size:
        log.info("negatives: %d of the configured %d (pretrain.negatives_fraction %.2f of %d tiles)", bounded, size,
                 cfg.negatives_fraction, n_tiles)
    return bounded


def for_data(cfg: PretrainConfig, n_tiles: int | None) -> PretrainConfig:
    """``cfg`` with its queue and bank bounded by the data: what the method is built with."""
    return cfg.model_copy(update={"queue_size": bounded_negatives(cfg.queue_size, cfg, n_tiles),
                                  "bank_size": bounded_negatives(cfg.bank_size, cfg, n_tiles)})
