"""The contrastive training loop: SGD with warm-up and cosine decay, AMP and channels-last on CUDA (the loss
read back only at logged or checkpointed steps there), checkpoints, exact resume.

Randomness of step s (its augmentations) is drawn after ``torch.manual_seed(f(seed, s))`` and its batch comes
from ``EpochSampler``, so step s is a pure function of (seed, s, state before s): a run resumed from a
checkpoint produces the same parameters as one that never stopped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from histcode.config import PretrainConfig
from histcode.errors import HistcodeError
from histcode.ssl.checkpoint import load_checkpoint, restore_rng, rng_state, save_checkpoint
from histcode.ssl.dataset import EpochSampler, TileDataset
from histcode.runtime import failpoint, resolve_workers, step_seed
from histcode.ssl.distributed import gather_no_grad
from histcode.ssl.losses import info_nce
from histcode.ssl.methods import AdCo, ContrastiveMethod, MoCo
from histcode.ssl.schedule import key_momentum

log = logging.getLogger(__name__)


class TrainingDiverged(HistcodeError, RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class StepLog:
    step: int
    loss: float
    lr: float
    img_per_s: float


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at step s: linear warm-up, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))

    return factor


def total_steps(cfg: PretrainConfig, n_tiles: int) -> int:
    per_epoch = max(1, n_tiles // cfg.batch_size)
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))


class Trainer:
    def __init__(self, method: ContrastiveMethod, augment: torch.nn.Module, dataset: TileDataset, cfg: PretrainConfig,
                 device: torch.device, steps: int, checkpoint_path: Path, rank: int = 0, world_size: int = 1) -> None:
        self.cfg, self.device, self.steps = cfg, device, steps
        self.dataset, self.checkpoint_path = dataset, checkpoint_path
        self.rank, self.world_size = rank, world_size
        self.method = method.to(device)
        self.augment = augment.to(device)
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            if device.type == "cuda" and not getattr(self.method, "shuffle_bn", False):
                # SimCLR normalises over the global batch; MoCo/AdCo keep per-process BN and shuffle the keys
                self.method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
            self.model = DistributedDataParallel(self.method, device_ids=[device.index] if device.type == "cuda" else None,
                                                 broadcast_buffers=False)
        else:
            self.model = self.method
        params = [p for p in self.method.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg.learning_rate(), momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(steps, cfg.warmup_steps))
        self.amp_dtype = None
        if cfg.amp and device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.channels_last = device.type == "cuda" and cfg.amp  # convolutions in NHWC under autocast
        self.step = 0
        self.extra: dict = {}  # caller's metadata kept in every checkpoint (e.g. the MLflow run id)

    # -- state ---------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
            "total_steps": self.steps, "rng": rng_state(), "config": self.cfg.model_dump(mode="json"), "extra": self.extra,
        }

    def save(self) -> Path:
        return save_checkpoint(self.checkpoint_path, self.state())

    def resume(self) -> bool:
        """Load the checkpoint if there is one; returns whether training continues from it."""
        if not self.checkpoint_path.is_file():
            return False
        payload = load_checkpoint(self.checkpoint_path)
        if payload["total_steps"] != self.steps:
            raise ValueError(f"{self.checkpoint_path}: made for {payload['total_steps']} steps, this run has {self.steps}; "
                             "start a fresh run instead of resuming")
        self.method.load_state_dict(payload["method"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        restore_rng(payload["rng"])
        self.step = int(payload["step"])
        self.extra = dict(payload.get("extra", {}))
        log.info("resumed from %s at step %d of %d", self.checkpoint_path, self.step, self.steps)
        return True

    # -- data ----------------------------------------------------------------------------------------------
    def loader(self, start: int, num: int, seed: int | None = None) -> DataLoader:
        sampler = EpochSampler(len(self.dataset), self.cfg.batch_size, self.cfg.seed if seed is None else seed,
                               start, num, self.rank, self.world_size, self.cfg.locality_chunk)
        workers = resolve_workers(self.cfg.num_workers, self.device)
        # spawned readers open their own slide handles; fork is unsafe once Lance or CUDA threads exist here
        return DataLoader(self.dataset, batch_size=self.cfg.batch_size // self.world_size, sampler=sampler,
                          num_workers=workers, pin_memory=self.device.type == "cuda", drop_last=False,
                          prefetch_factor=4 if workers else None, persistent_workers=False,
                          multiprocessing_context="spawn" if workers else None)

    def init_bank(self) -> None:
        """Fill the negatives before the first step. AdCo's bank, with ``bank_init: train`` the authors'
        ``init_memory``: for bank_size / batch steps the encoder trains on InfoNCE against the (still random)
        bank while each step's keys are written into the next rows of the bank, then the key encoder becomes a
        copy of the trained query encoder; ``keys``: the bank is filled with keys of the untrained encoder.
        MoCo's queue is filled with keys of the untrained key encoder."""
        method = self.method
        if isinstance(method, AdCo) and not bool(method.bank_ready):
            size, train = method.bank.shape[0], self.cfg.bank_init == "train"
        elif isinstance(method, MoCo) and not bool(method.queue_ready):
            size, train = method.queue.shape[0], False
        else:
            return
        steps = math.ceil(size / self.cfg.batch_size)
        rows = []
        torch.manual_seed(step_seed(self.cfg.seed, -1))
        method.m = key_momentum(self.cfg, 0, self.steps)
        for batch in self.loader(0, steps, seed=self.cfg.seed + 7919):
            v1, v2 = self.augment(batch.to(self.device))
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                if train:
                    method.momentum_update()
                    q = method.embed(v1)
                with torch.no_grad():
                    keys = method.keys(v2).float()
                if train:
                    loss = info_nce(q, keys, method.negatives(), method.temperature)
            if train:
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            rows.append(gather_no_grad(keys))
        filled = torch.cat(rows)
        while filled.shape[0] < size:  # fewer tiles than slots: repeat
            filled = torch.cat([filled, filled])
        if isinstance(method, MoCo):
            method.init_queue(filled[:size])
            return
        method.init_bank(filled[:size])
        if train:
            method.copy_to_keys()

    # -- training ------------------------------------------------------------------------------------------
    def fit(self, on_log: Callable[[StepLog], None] | None = None, progress: bool = True) -> list[StepLog]:
        self.method.train()
        self.init_bank()
        history: list[StepLog] = []
        remaining = self.steps - self.step
        if remaining <= 0:
            return history
        bar = tqdm(total=self.steps, initial=self.step, desc=f"pretrain {self.method.name}", unit="step",
                   disable=not progress or self.rank != 0)
        window_start, window_imgs = time.perf_counter(), 0
        global_batch = self.cfg.batch_size
        for batch in self.loader(self.step, remaining):
            torch.manual_seed(step_seed(self.cfg.seed, self.step))
            x = batch.to(self.device, non_blocking=True)
            v1, v2 = self.augment(x)
            if hasattr(self.method, "momentum_update"):  # MoCo, AdCo: a function of the step, so it resumes exactly
                self.method.m = key_momentum(self.cfg, self.step, self.steps)
            if self.channels_last:
                v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss = self.model(v1, v2)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            self.method.after_step()
            self.step += 1
            window_imgs += global_batch
            logging_now = self.step % self.cfg.log_every == 0 or self.step == self.steps
            saving_now = self.rank == 0 and (self.step % self.cfg.checkpoint_every == 0 or self.step == self.steps)
            if not (logging_now or saving_now or self.device.type == "cpu"):
                bar.update()
                continue  # on a GPU the loss is read (a host sync) only when it is logged or checkpointed
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingDiverged(f"loss is {value} at step {self.step}; lower pretrain.lr or check the data")
            if logging_now:
                elapsed = time.perf_counter() - window_start
                entry = StepLog(self.step, value, lr, window_imgs / max(elapsed, 1e-9))
                history.append(entry)
                if on_log is not None and self.rank == 0:
                    on_log(entry)
                window_start, window_imgs = time.perf_counter(), 0
                bar.set_postfix(loss=f"{value:.3f}", img_s=f"{entry.img_per_s:.0f}", refresh=False)
            if saving_now:
                self.save()
                failpoint("pretrain.checkpoint")
            bar.update()
        bar.close()
        return history
