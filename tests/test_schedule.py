"""Short-schedule settings as the methods' authors scale them: the key momentum rises to 1 over the run
(BYOL's cosine), queue and bank hold at most a share of the tiles, MoCo's queue starts filled with keys, and the
learning rate follows the linear scaling rule."""

from __future__ import annotations

import math

import pytest
import torch

from histcode.config import HistcodeConfig, PretrainConfig, ProbeConfig
from histcode.ssl.augment import TwoViews
from histcode.ssl.dataset import dataset_from_catalog
from histcode.ssl.encoders import build_encoder
from histcode.ssl.methods import build_method
from histcode.ssl.schedule import bounded_negatives, key_momentum
from histcode.ssl.train import Trainer
from histcode.store.catalog import Catalog
from histcode.tiling.spec import spec_id_of

TINY = PretrainConfig(image_px=32, batch_size=8, max_steps=5, log_every=1, checkpoint_every=100, num_workers=0,
                      queue_size=4096, bank_size=1024, warmup_steps=1, probe=ProbeConfig(enabled=False))


def test_key_momentum_follows_byol_s_cosine_from_the_base_to_one() -> None:
    cfg = TINY.model_copy(update={"key_momentum": 0.99})
    total = 11
    for k in range(total):  # Grill et al. 2020, eq. in section 3.2: tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2
        expected = 1 - (1 - 0.99) * (math.cos(math.pi * k / (total - 1)) + 1) / 2
        assert key_momentum(cfg, k, total) == pytest.approx(expected)
    assert key_momentum(cfg, 0, total) == pytest.approx(0.99) and key_momentum(cfg, total - 1, total) == 1.0
    constant = cfg.model_copy(update={"key_momentum_schedule": "constant"})
    assert {key_momentum(constant, k, total) for k in range(total)} == {0.99}


def test_negatives_are_bounded_by_a_share_of_the_tiles_in_whole_batches() -> None:
    cfg = TINY.model_copy(update={"negatives_fraction": 0.25})
    assert bounded_negatives(4096, cfg, 300) == 72  # 0.25 * 300 = 75 -> 9 batches of 8
    assert bounded_negatives(40, cfg, 300) == 40  # smaller than the bound: as configured
    assert bounded_negatives(4096, cfg, 10) == 8  # at least one batch
    assert bounded_negatives(4096, cfg, None) == 4096
    moco = build_method(build_encoder("resnet18_l3"), cfg.model_copy(update={"method": "moco"}), n_tiles=300)
    adco = build_method(build_encoder("resnet18_l3"), cfg.model_copy(update={"method": "adco"}), n_tiles=300)
    assert moco.queue.shape[0] == 72 and adco.bank.shape[0] == 72


def test_the_learning_rate_follows_the_linear_scaling_rule() -> None:
    assert PretrainConfig(method="adco", batch_size=64).learning_rate() == pytest.approx(0.03 * 64 / 256)
    assert PretrainConfig(method="moco", batch_size=256).learning_rate() == pytest.approx(0.03)
    assert PretrainConfig(method="simclr", batch_size=64, lr_scale=2).learning_rate() == pytest.approx(0.3 * 64 / 256 * 2)
    assert PretrainConfig(method="simclr", lr=0.5).learning_rate() == 0.5


def test_the_trainer_moves_the_key_encoder_by_the_schedule_and_fills_moco_s_queue_with_keys(tiled_catalog,
                                                                                            tmp_path) -> None:
    cfg = TINY.model_copy(update={"method": "moco"})
    dataset = dataset_from_catalog(Catalog(tiled_catalog), spec_id_of(HistcodeConfig().tiling), 256)
    torch.manual_seed(0)
    method = build_method(build_encoder(cfg.encoder), cfg, n_tiles=len(dataset))
    assert method.queue.shape[0] < cfg.queue_size  # the tiny cohort has far fewer tiles than 4096
    trainer = Trainer(method, TwoViews(cfg.augment, cfg.image_px), dataset, cfg, torch.device("cpu"), 5,
                      tmp_path / "ckpt.pt")
    seen = []
    update = method.momentum_update
    method.momentum_update = lambda: (seen.append(method.m), update())[1]
    random_queue = method.queue.clone()
    trainer.init_bank()  # what fit does first
    assert bool(method.queue_ready) and not seen  # filled without a training step
    # its rows are keys of tiles, which sit far closer to each other than random unit vectors in 128-d do
    off = ~torch.eye(len(random_queue), dtype=torch.bool)
    assert (method.queue @ method.queue.T)[off].mean() > 5 * (random_queue @ random_queue.T)[off].abs().mean()
    trainer.fit(progress=False)
    assert seen == pytest.approx([key_momentum(cfg, k, 5) for k in range(5)])
    assert trainer.optimizer.param_groups[0]["initial_lr"] == pytest.approx(cfg.learning_rate())
    dataset.close()
