"""Contrastive training: exact resume, a 2-process gloo DDP step, a real run into MLflow, the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from histcode.config import AugmentConfig, HistcodeConfig, PretrainConfig, ProbeConfig
from histcode.ssl.augment import TwoViews
from histcode.ssl.dataset import EpochSampler, dataset_from_catalog
from histcode.ssl.encoders import Encoder, build_encoder
from histcode.ssl.methods import SimCLR, build_method, projection_head
from histcode.ssl.train import Trainer
from histcode.store.catalog import Catalog
from histcode.tiling.spec import spec_id_of

TINY = PretrainConfig(image_px=32, batch_size=8, max_steps=4, checkpoint_every=2, log_every=1, num_workers=0,
                      bank_size=16, queue_size=16, warmup_steps=1, probe=ProbeConfig(enabled=False))


def _trainer(catalog: Path, cfg: PretrainConfig, ckpt: Path, steps: int = 4) -> Trainer:
    dataset = dataset_from_catalog(Catalog(catalog), spec_id_of(HistcodeConfig().tiling), 256)
    torch.manual_seed(cfg.seed)
    method = build_method(build_encoder(cfg.encoder), cfg)
    return Trainer(method, TwoViews(cfg.augment, cfg.image_px), dataset, cfg, torch.device("cpu"), steps, ckpt)


def test_epoch_sampler_is_global_resumable_and_sharded() -> None:
    full = list(EpochSampler(10, 4, seed=1, start_step=0, num_steps=5))
    assert len(full) == 20 and sorted(full[:8]) == sorted(set(full[:8]))  # one epoch: 2 batches, no repeats
    assert list(EpochSampler(10, 4, seed=1, start_step=3, num_steps=2)) == full[12:]
    shards = [list(EpochSampler(10, 4, 1, 0, 5, rank=r, world_size=2)) for r in (0, 1)]
    for step in range(5):
        batch = full[4 * step:4 * step + 4]
        assert shards[0][2 * step:2 * step + 2] == batch[0::2] and shards[1][2 * step:2 * step + 2] == batch[1::2]
    with pytest.raises(Exception, match="fewer than one batch"):
        EpochSampler(3, 4, 0, 0, 1)


def test_locality_aware_order_shuffles_runs_of_neighbours_and_still_resumes() -> None:
    """locality_chunk c: every epoch is still a permutation of all tiles, made of runs of c consecutive tiles
    (neighbours in read order) in a shuffled order; a resumed sampler continues it exactly."""
    sampler = EpochSampler(103, 10, seed=2, start_step=0, num_steps=10, chunk=4)
    order = sampler.permutation(0)
    assert sorted(order.tolist()) == list(range(103))
    assert order[0] % 4 == 0 and all(order[i] == order[i - 1] + 1 for i in range(1, 103) if order[i] % 4)
    starts = [int(v) for v in order if v % 4 == 0]
    assert len(starts) == 26 and starts != sorted(starts)  # whole runs, in a shuffled order
    full = list(EpochSampler(103, 10, 2, 0, 12, chunk=4))
    assert list(EpochSampler(103, 10, 2, 7, 5, chunk=4)) == full[70:]
    assert sampler.permutation(1).tolist() != order.tolist()


def test_dataset_reads_the_same_tiles_in_forked_workers(tiled_catalog) -> None:
    dataset = dataset_from_catalog(Catalog(tiled_catalog), spec_id_of(HistcodeConfig().tiling), 256)
    expected = torch.stack([dataset[i] for i in range(24)])  # the main process opens readers first
    assert expected.shape == (24, 3, 256, 256) and expected.dtype == torch.uint8
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2, shuffle=False)
    got = torch.cat([b for _, b in zip(range(3), loader)])
    assert torch.equal(got, expected)  # forked workers must not share the parent's file handles
    dataset.close()


@pytest.mark.parametrize("method", ["adco", "moco", "simclr"])
def test_resume_equals_uninterrupted(method: str, tiled_catalog, tmp_path) -> None:
    cfg = TINY.model_copy(update={"method": method})
    straight = _trainer(tiled_catalog, cfg, tmp_path / "a" / "ckpt.pt")
    straight.fit(progress=False)

    interrupted = _trainer(tiled_catalog, cfg, tmp_path / "b" / "ckpt.pt")

    def stop_after_step_3(entry) -> None:
        if entry.step == 3:  # step 2 was checkpointed, step 3 is lost with the "crash"
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(on_log=stop_after_step_3, progress=False)
    resumed = _trainer(tiled_catalog, cfg, tmp_path / "b" / "ckpt.pt")
    assert resumed.resume() and resumed.step == 2
    resumed.fit(progress=False)
    a, b = straight.method.state_dict(), resumed.method.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_refuses_a_different_length(tiled_catalog, tmp_path) -> None:
    first = _trainer(tiled_catalog, TINY, tmp_path / "ckpt.pt", steps=2)
    first.fit(progress=False)
    with pytest.raises(ValueError, match="made for 2 steps"):
        _trainer(tiled_catalog, TINY, tmp_path / "ckpt.pt", steps=4).resume()


# -- DDP ----------------------------------------------------------------------------------------------------
class _Tiles(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.data = (torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def _bn_free_simclr(cfg: PretrainConfig) -> SimCLR:
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten())
    method = SimCLR(Encoder(backbone, 8, "tiny"), cfg)
    method.head = projection_head(8, 8, cfg.proj_dim, batch_norm=False)  # BN statistics are per process
    return method


DDP_CFG = PretrainConfig(method="simclr", batch_size=8, image_px=16, num_workers=0, warmup_steps=0, lr=0.5,
                         proj_dim=4, augment=AugmentConfig(crop_scale=(1, 1), hflip_p=0, vflip_p=0, rot90_p=0,
                                                           color_jitter_p=0, grayscale_p=0, blur_p=0, stain_p=0))


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    trainer = Trainer(_bn_free_simclr(DDP_CFG), TwoViews(DDP_CFG.augment, 16), _Tiles(), DDP_CFG,
                      torch.device("cpu"), 2, Path(out_dir) / "ckpt.pt", rank=rank, world_size=2)
    history = trainer.fit(progress=False)
    torch.save({"state": trainer.method.state_dict(), "loss": history[-1].loss}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_process_gloo_ddp_equals_one_process_on_the_global_batch(tmp_path) -> None:
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = Trainer(_bn_free_simclr(DDP_CFG), TwoViews(DDP_CFG.augment, 16), _Tiles(), DDP_CFG, torch.device("cpu"),
                     2, tmp_path / "single.pt")
    history = single.fit(progress=False)
    for key, value in single.method.state_dict().items():
        assert torch.equal(r0["state"][key], r1["state"][key]), f"ranks diverged on {key}"
        torch.testing.assert_close(r0["state"][key], value, rtol=1e-4, atol=1e-5, msg=f"DDP != global batch: {key}")
    assert r0["loss"] == pytest.approx(history[-1].loss, rel=1e-5)  # negatives from both processes


# -- the real thing: CLI, MLflow, registry, kill and resume -----------------------------------------------
def _write_params(ws: Path, **pretrain) -> None:
    cfg = {"pretrain": TINY.model_copy(update=pretrain).model_dump(mode="json")}
    (ws / "params.yaml").write_text(yaml.safe_dump(cfg))


def _histcode(ws: Path, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "histcode", "--workspace", str(ws), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.integration
def test_pretrain_cli_tracks_probes_and_registers(tiled_workspace) -> None:
    """(Killed and resumed pretraining is part of the fault matrix, tests/test_faults.py.)"""
    from mlflow import MlflowClient

    ws = tiled_workspace.root
    _write_params(ws, method="adco", max_steps=6, checkpoint_every=2, probe=ProbeConfig(enabled=True, folds=3))
    out, _ = _histcode(ws, "pretrain").communicate(timeout=300)
    assert "linear probe" in out, out
    uri = f"sqlite:///{ws}/mlruns/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("pretrain").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "adco" and run.data.params["data.n_tiles"]
    metrics = set(run.data.metrics)
    for half in ("tune", "report"):  # every task on both halves, trained, random init and colour side by side
        for task in ("tissue", "tumour", "subtype"):
            for suffix in ("", "/restained"):
                assert {f"probe/{half}/{task}{suffix}/{n}_{m}" for n in ("trained", "random_init", "colour")
                        for m in ("auc", "accuracy")} <= metrics
    # the reporting half's gains with their paired intervals
    assert {"probe/report/subtype/restained/gain_vs_random_init_ci_low",
            "probe/report/tissue/gain_vs_colour_ci_high"} <= metrics
    assert not any(k.startswith("probe/tune/") and "gain" in k for k in metrics)
    assert "re-stained" in out and "reporting half" in out
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert max(steps) == 6 and "mlflow.source.git.commit" in run.data.tags and "histcode.data_version" in run.data.tags
    # one copy of the checkpoint: in the run's folder, referenced by the run (relative to the workspace), not
    # copied into MLflow's artifacts
    assert not client.list_artifacts(run.info.run_id, "checkpoint")
    checkpoint = ws / run.data.tags["histcode.checkpoint"]
    assert not Path(run.data.tags["histcode.checkpoint"]).is_absolute() and checkpoint.is_file()
    # the registered encoder loads and runs on any batch size
    version = client.get_model_version_by_alias("histcode-encoder", "adco")
    from histcode.tracking import Tracker
    from histcode.workspace import Workspace

    model = Tracker(Workspace(ws)).load_model("models:/histcode-encoder@adco")
    for batch in (1, 5):
        assert model(torch.rand(batch, 3, 32, 32)).shape == (batch, 256)
    assert version.tags["method"] == "adco"
    # the encoder carries how it reads tiles, so its feature views read them the same way
    from histcode.ssl.stain_norm import parse

    assert parse(version.tags["stain_norm"]).method == "macenko"
    # the same configuration on the same tiles again: reused, nothing trained or registered, the same report
    first = json.loads((ws / "metrics" / "pretrain.json").read_text())
    (ws / "metrics" / "pretrain.json").unlink()  # as `dvc repro` removes a stage's outputs before running it
    again, _ = _histcode(ws, "pretrain").communicate(timeout=300)
    assert "up to date, reused" in again, again
    assert len(client.search_runs([client.get_experiment_by_name("pretrain").experiment_id])) == 1
    assert [v.version for v in client.search_model_versions("name = 'histcode-encoder'")] == [version.version]
    assert json.loads((ws / "metrics" / "pretrain.json").read_text()) == first


def test_exclude_test_folds_leaves_those_patients_out_of_pretraining(headed_workspace, tiled_workspace) -> None:
    from histcode.ssl.pretrain import pretraining_data

    cfg = headed_workspace.config()
    catalog = Catalog.of(headed_workspace)
    transductive = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"exclude_test_folds": ()})})
    everything = pretraining_data(catalog, transductive)
    assert not everything.excluded_slides and everything.excluded_folds == ()
    # the default, auto: the first half of the label set's folds (3 here: one), none before there is a label set
    assert cfg.pretrain.exclude_test_folds == "auto" and pretraining_data(catalog, cfg).excluded_folds == (0,)
    assert pretraining_data(Catalog.of(tiled_workspace), cfg).excluded_folds == ()
    strict = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"exclude_test_folds": (0,)})})
    data = pretraining_data(catalog, strict)
    fold0 = {r["patient_id"] for r in catalog.query("SELECT patient_id FROM cv_folds WHERE fold = 0")}
    patient = {s["slide_id"]: s["patient_id"] for s in catalog.slides()}
    assert data.excluded_slides and {patient[s] for s in data.excluded_slides} == fold0
    assert not {patient[s] for s in data.slide_ids} & fold0
    assert sorted(data.slide_ids + data.excluded_slides) == sorted(everything.slide_ids)
    assert data.label_version == catalog.query("SELECT label_version FROM label_sets WHERE is_current")[0]["label_version"]
    with pytest.raises(ValueError, match="folds are"):
        pretraining_data(catalog, strict.model_copy(update={"pretrain": strict.pretrain.model_copy(update={"exclude_test_folds": (7,)})}))
    with pytest.raises(ValueError, match="histcode labels ingest"):
        pretraining_data(Catalog.of(tiled_workspace), strict)  # no label set yet: no folds to leave out


def _shuffle_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from histcode.ssl.shuffle_bn import shuffled, unshuffled

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # each process draws its own permutation; process 0's is the one used
    x = torch.arange(8, dtype=torch.float32).view(4, 2) + 100 * rank  # rows tell which process they came from
    mixed, undo = shuffled(x)
    back = unshuffled(mixed * 2, undo)
    torch.save({"mixed": mixed, "back": back}, Path(out_dir) / f"shuffle{rank}.pt")
    dist.destroy_process_group()


def test_keys_are_shuffled_across_processes_and_put_back(tmp_path) -> None:
    """MoCo's DDP shuffle-BN: the global key batch is permuted across processes before the key encoder and
    restored after it, each process getting back exactly its own rows."""
    torch.multiprocessing.spawn(_shuffle_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"shuffle{r}.pt", weights_only=True) for r in (0, 1)]
    for rank, part in enumerate(parts):
        x = torch.arange(8, dtype=torch.float32).view(4, 2) + 100 * rank
        torch.testing.assert_close(part["back"], x * 2)
    together = torch.cat([p["mixed"] for p in parts])
    everything = torch.cat([torch.arange(8, dtype=torch.float32).view(4, 2) + 100 * r for r in (0, 1)])
    assert sorted(together[:, 0].tolist()) == sorted(everything[:, 0].tolist())  # a permutation of the global batch
