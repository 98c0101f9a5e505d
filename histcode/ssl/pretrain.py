"""Pretrain an encoder on the catalog's tiles, track it in MLflow, probe it, register it.

One call = one MLflow run in experiment ``pretrain``: the whole ``pretrain`` section as params, per-step
loss, learning rate and throughput, the linear probe of the trained encoder beside the same architecture at
its random initialisation and a colour-only baseline, the checkpoint as an artifact, and the encoder as a
registered model (``histcode-encoder``; ``models:/histcode-encoder/latest`` or ``@<method>``) that takes [0, 1]
images of any batch size. ``resume=True`` continues an interrupted run (same checkpoint, same MLflow run).
Under torchrun, every process trains; process 0 alone tracks, probes and registers.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from histcode.config import HistcodeConfig, PretrainConfig, stable_hash
from histcode.store.files import write_json
from histcode.ssl import distributed as dist_util
from histcode.ssl.augment import TwoViews
from histcode.ssl.dataset import NoTilesError, dataset_from_catalog
from histcode.ssl.encoders import COLOUR, Encoder, build_encoder
from histcode.ssl.methods import build_method
from histcode.ssl.modules import MODULE_ARTIFACT, STATE, log_module
from histcode.ssl.schedule import for_data
from histcode.ssl.probe import colour_features, embed, load_probe_set, probe_report, restained
from histcode.ssl.stain_norm import describe as describe_stain_norm, normalise_dataset
from histcode.ssl.train import StepLog, Trainer, total_steps
from histcode.store.catalog import Catalog, CatalogError
from histcode.tiling.spec import spec_id_of
from histcode.tracking import Tracker
from histcode.workspace import Workspace, bundled_source_dir
from histcode.runtime import resolve_device

log = logging.getLogger(__name__)

EXPERIMENT = "pretrain"
DONE = "done.json"  # written next to the checkpoint when a run has finished, probed and registered
RUNTIME_KNOBS = {"num_workers", "device", "log_every", "checkpoint_every", "register_as", "probe", "amp"}


@dataclass
class PretrainResult:
    run_id: str | None
    method: str
    steps: int
    resumed: bool
    start_step: int = 0  # where this call started (> 0 after a resume)
    history: list[StepLog] = field(default_factory=list)
    probe: dict[str, float] = field(default_factory=dict)
    model_uri: str | None = None
    version: str | None = None
    checkpoint: Path | None = None

    @property
    def final_loss(self) -> float | None:
        return self.history[-1].loss if self.history else None

    @property
    def img_per_s(self) -> float | None:
        """Mean throughput, the first (warm-up) step left out."""
        rates = [h.img_per_s for h in self.history[1:]] or [h.img_per_s for h in self.history]
        return round(sum(rates) / len(rates), 2) if rates else None


@dataclass
class PretrainingData:
    """The slides a pretraining run reads: the tiled slides of the training cohorts, less the patients of
    ``pretrain.exclude_test_folds`` (folds of the label set ``label_version``)."""

    slide_ids: list[str]
    cohorts: list[str]
    excluded_slides: list[str] = field(default_factory=list)
    excluded_folds: tuple[int, ...] = ()
    label_version: str | None = None


AUTO = "auto"


def excluded_folds(setting: tuple[int, ...] | str, known: list[int]) -> tuple[int, ...]:
    """The folds ``pretrain.exclude_test_folds`` names among a label set's ``known`` folds; ``auto``: the first
    half of them (rounded down, at least one)."""
    folds = sorted(f for f in known if f >= 0)
    if setting == AUTO:
        return tuple(folds[:max(1, len(folds) // 2)]) if len(folds) > 1 else ()
    return tuple(sorted(set(setting)))


def pretraining_data(catalog: Catalog, cfg: HistcodeConfig) -> PretrainingData:
    cohorts = catalog.training_cohorts(cfg.cohorts.train)
    slides = catalog.tiled_slides(spec_id_of(cfg.tiling), cohorts)
    setting = cfg.pretrain.exclude_test_folds
    if setting != AUTO and not setting:
        return PretrainingData([s["slide_id"] for s in slides], cohorts)
    labels = catalog.query("SELECT label_version FROM label_sets WHERE is_current")
    plan = catalog.query("SELECT patient_id, fold FROM cv_folds")
    known = sorted({r["fold"] for r in plan})
    folds = excluded_folds(setting, known) if labels and plan else ()
    if setting == AUTO and not folds:
        log.warning("pretraining sees every patient (transductive): there is no label set with folds yet, so "
                    "pretrain.exclude_test_folds: auto leaves none out; run `histcode labels ingest` first for "
                    "strict figures on patients the encoder never saw")
        return PretrainingData([s["slide_id"] for s in slides], cohorts)
    if not labels or not plan:
        raise ValueError("pretrain.exclude_test_folds needs the cross-validation folds of a label set: run "
                         "`histcode labels ingest` before `histcode pretrain`")
    if not set(folds) <= set(known):
        raise ValueError(f"pretrain.exclude_test_folds {list(folds)}: the label set's folds are {known}")
    patients = {r["patient_id"] for r in plan if r["fold"] in folds}
    kept = [s["slide_id"] for s in slides if s["patient_id"] not in patients]
    excluded = [s["slide_id"] for s in slides if s["patient_id"] in patients]
    return PretrainingData(kept, cohorts, excluded, folds, labels[0]["label_version"])


def data_version(tile_ids: list[str]) -> str:
    """Identity of the training data: its sorted tile ids."""
    return stable_hash(sorted(tile_ids), 16)


def run_dir(ws: Workspace, cfg: PretrainConfig, spec_id: str, version: str) -> Path:
    """Where a run's checkpoint lives: one folder per (training configuration, tiling spec, training data), so
    every run keeps its own checkpoint."""
    key = stable_hash({"pretrain": cfg.model_dump(mode="json", exclude=RUNTIME_KNOBS), "spec": spec_id,
                       "data": version}, 10)
    return ws.outputs_dir / "pretrain" / f"{cfg.method}-{cfg.encoder}-{key}"


def _init_distributed(device_name: str) -> tuple[torch.device, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return resolve_device(device_name), 0, 1
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size()


def fresh_encoder(cfg: PretrainConfig) -> Encoder:
    """The encoder exactly as training starts from it (same seed, same initialisation)."""
    torch.manual_seed(cfg.seed)
    return build_encoder(cfg.encoder, cfg.init)


def probe_metrics(trained: Encoder, cfg: PretrainConfig, source_dir: Path, device: torch.device) -> dict[str, float]:
    """The probe (``histcode.ssl.probe``) of the trained encoder, the same architecture at its initialisation
    and the colour baseline, on the tiles as they are and re-stained; loose tiles are not stain-normalised (see
    ``histcode.ssl.stain_norm``), so the figures measure the encoder's own robustness to stain."""
    probe = load_probe_set(source_dir, cfg.probe.split, cfg.image_px)
    initial = fresh_encoder(cfg).to(device)
    features = {}
    for suffix, images in (("", probe.images), ("/restained", restained(probe.images, cfg.probe, cfg.seed))):
        features[suffix] = {"trained": embed(trained, images, device), "random_init": embed(initial, images, device),
                            "colour": colour_features(images)}
    return probe_report(features, probe, cfg.probe, cfg.seed)


def pretrain(ws: Workspace, cfg: HistcodeConfig, resume: bool = False, progress: bool = True,
             probe_source: Path | None = None) -> PretrainResult:
    pcfg = cfg.pretrain
    device, rank, world = _init_distributed(pcfg.device)
    catalog = Catalog.of(ws)
    spec_id = spec_id_of(cfg.tiling)
    data = pretraining_data(catalog, cfg)
    dataset = dataset_from_catalog(catalog, spec_id, cfg.tiling.tile_px, slide_ids=data.slide_ids)
    version = data_version(dataset.tile_ids)
    normalise_dataset(dataset, pcfg.stain_norm)
    log.info("pretraining on %d tiles of %d slides (cohorts %s)%s", len(dataset), len(dataset.slides),
             ", ".join(data.cohorts), f"; {len(data.excluded_slides)} slides of folds {list(data.excluded_folds)} "
             "left out" if data.excluded_folds else "")
    steps = total_steps(pcfg, len(dataset))
    method = build_method(fresh_encoder(pcfg), pcfg, n_tiles=len(dataset))
    folder = run_dir(ws, pcfg, spec_id, version)
    trainer = Trainer(method, TwoViews(pcfg.augment, pcfg.image_px), dataset, pcfg, device, steps,
                      folder / "checkpoint.pt", rank, world)
    resumed = trainer.resume() if resume else False
    start_step = trainer.step
    if resume and not resumed:
        log.info("no checkpoint in %s: starting a new run", folder)

    tracker = Tracker(ws) if rank == 0 else None
    run_id = trainer.extra.get("run_id") if resumed else None
    if tracker is not None:
        if run_id:
            tracker.reopen_run(run_id)  # the same run continues; the checkpoint stays for another --resume
        else:
            run_id = _new_run(tracker, ws, trainer, pcfg, data, version, spec_id, len(dataset), steps, world)
        trainer.extra["run_id"] = run_id

    def on_log(entry: StepLog) -> None:
        tracker.log_metrics(run_id, {"loss": entry.loss, "lr": entry.lr, "img_per_s": entry.img_per_s}, entry.step)

    result = PretrainResult(run_id, pcfg.method, steps, resumed, start_step, checkpoint=trainer.checkpoint_path)
    with tracker.closing(run_id) if tracker is not None else contextlib.nullcontext():
        try:
            result.history = trainer.fit(on_log if tracker else None, progress)
        finally:
            dataset.close()
        if tracker is not None:
            _finish(result, tracker, method.encoder, pcfg, ws, spec_id, device, data, version, probe_source)
    dist_util.barrier()
    if tracker is not None:
        log.info("pretrain %s: %d steps, loss %.4f, registered %s version %s", pcfg.method, steps,
                 result.final_loss or float("nan"), pcfg.register_as, result.version)
    return result


def _finish(result: PretrainResult, tracker: Tracker, encoder: Encoder, pcfg: PretrainConfig, ws: Workspace,
            spec_id: str, device: torch.device, data: PretrainingData, version: str, probe_source: Path | None) -> None:
    """Probe, export and register the encoder (the checkpoint stays where it is: the run's tag names it)."""
    run_id = result.run_id
    if pcfg.probe.enabled:
        source = probe_source or (ws.path(pcfg.probe.source_dir) if pcfg.probe.source_dir else bundled_source_dir())
        result.probe = probe_metrics(encoder, pcfg, source, device)
        tracker.log_metrics(run_id, result.probe, result.steps)
    exported = copy.deepcopy(encoder).cpu().float().eval()
    log_module(tracker, run_id, exported)  # before registering: a version always has its module
    result.model_uri, result.version = tracker.log_torch_model(
        run_id, exported, "encoder", (3, pcfg.image_px, pcfg.image_px), encoder.dim, pcfg.register_as,
        aliases=(pcfg.method,),
        version_tags={"method": pcfg.method, "encoder": pcfg.encoder, "image_px": pcfg.image_px, "dim": encoder.dim,
                      "spec_id": spec_id, "run_id": run_id, "stain_norm": describe_stain_norm(pcfg.stain_norm),
                      "cohorts": ",".join(data.cohorts),
                      "excluded_folds": ",".join(map(str, data.excluded_folds)),
                      "excluded_folds_label_version": data.label_version or ""},
        weights_artifact=f"{MODULE_ARTIFACT}/{STATE}",  # the weights are stored once, in the module
    )
    write_json(result.checkpoint.parent / DONE, {
        "run_id": run_id, "method": result.method, "steps": result.steps, "version": result.version,
        "model_uri": result.model_uri, "final_loss": result.final_loss, "probe": result.probe,
        "img_per_s": result.img_per_s, "data_version": version,
    })


def completed(ws: Workspace, cfg: HistcodeConfig) -> dict | None:
    """The finished run of exactly this configuration on exactly the current tiles, if there is one (its
    done.json, with its MLflow run still FINISHED); None means training would do new work."""
    if not ws.catalog_path.is_file():
        return None
    catalog = Catalog.of(ws)
    try:
        data = pretraining_data(catalog, cfg)
        tile_ids = dataset_from_catalog(catalog, spec_id_of(cfg.tiling), cfg.tiling.tile_px, data.slide_ids).tile_ids
    except (NoTilesError, ValueError, CatalogError):
        return None
    version = data_version(tile_ids)
    done = run_dir(ws, cfg.pretrain, spec_id_of(cfg.tiling), version) / DONE
    if not done.is_file():
        return None
    record = json.loads(done.read_text())
    if record.get("data_version") != version:
        return None
    try:
        status = Tracker(ws).client.get_run(record["run_id"]).info.status
    except Exception:  # noqa: BLE001 -- the run was deleted, or the store moved
        return None
    return record if status == "FINISHED" else None


def _new_run(tracker: Tracker, ws: Workspace, trainer: Trainer, pcfg: PretrainConfig, data: PretrainingData,
             version: str, spec_id: str, n_tiles: int, steps: int, world: int) -> str:
    """A new run; its checkpoint is referenced (workspace-relative path), not copied into MLflow."""
    bounded = for_data(pcfg, n_tiles)
    checkpoint = trainer.checkpoint_path
    where = checkpoint.relative_to(ws.root).as_posix() if checkpoint.is_relative_to(ws.root) else str(checkpoint)
    run_id = tracker.start_run(EXPERIMENT, f"{pcfg.method}-{pcfg.encoder}", tags={
        "histcode.method": pcfg.method, "histcode.spec_id": spec_id, "histcode.data_version": version,
        "histcode.checkpoint": where, "histcode.cohorts": ",".join(data.cohorts),
    })
    try:
        tracker.log_params(run_id, {**pcfg.model_dump(mode="json"), "data": {
            "spec_id": spec_id, "n_tiles": n_tiles, "n_slides": len(data.slide_ids), "total_steps": steps,
            "world_size": world, "data_version": version, "cohorts": data.cohorts,
            "excluded_slides": len(data.excluded_slides), "excluded_folds": list(data.excluded_folds),
        }, "effective": {  # what the settings come to on this data (histcode.ssl.schedule)
            "lr": pcfg.learning_rate(), "queue_size": bounded.queue_size, "bank_size": bounded.bank_size,
        }})
    except BaseException:
        tracker.end_run(run_id, "FAILED")  # a run whose params cannot be logged ends at once
        raise
    return run_id


BASELINES = ("random", "colour")  # encoders registered without training: the ablation's reference rows


def baseline_tags(cfg: PretrainConfig, method: str) -> dict[str, str]:
    """What a baseline encoder version is of: its architecture, seed, input size and how it reads tiles (the
    same stain normalisation as the encoders trained with ``cfg``, so a comparison reads every tile alike)."""
    if method not in BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, not {method!r}")
    tags = {"method": method, "encoder": cfg.encoder if method == "random" else COLOUR, "image_px": str(cfg.image_px),
            "stain_norm": describe_stain_norm(cfg.stain_norm)}
    return {**tags, "seed": str(cfg.seed)} if method == "random" else tags


def register_baseline_encoder(ws: Workspace, cfg: HistcodeConfig, method: str) -> str:
    """Register a reference encoder under the alias ``method``: ``random``, the encoder exactly as training would
    start from it, or ``colour``, the per-channel mean and sd of each tile (``histcode.ssl.encoders.COLOUR``).
    Both carry the ``stain_norm`` tag of ``pretrain.stain_norm``, so their feature views read tiles through the
    same normalisation as the trained encoders'. Returns the registered version."""
    pcfg = cfg.pretrain
    tags = baseline_tags(pcfg, method)
    tracker = Tracker(ws)
    with tracker.run(EXPERIMENT, f"{method}-{tags['encoder']}", tags={"histcode.method": method}) as run_id:
        tracker.log_params(run_id, {**tags, "stain_norm": pcfg.stain_norm.model_dump(mode="json")})
        encoder = (fresh_encoder(pcfg) if method == "random" else build_encoder(COLOUR)).eval()
        log_module(tracker, run_id, encoder)
        _, version = tracker.log_torch_model(
            run_id, encoder, "encoder", (3, pcfg.image_px, pcfg.image_px), encoder.dim, pcfg.register_as,
            aliases=(method,), version_tags={**tags, "dim": encoder.dim, "run_id": run_id},
            weights_artifact=f"{MODULE_ARTIFACT}/{STATE}",
        )
    return version
