"""Typed configuration, one pydantic model per stage, combined in one root read from params.yaml.

Every section forbids unknown keys so a typo in params.yaml is an error, not a silently ignored knob.
Units are part of the type names: ``MicronsPerPixel``, ``Pixels``, ``SquareMicrons``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MicronsPerPixel = Annotated[float, Field(gt=0, description="micrometres per pixel")]
Microns = Annotated[float, Field(gt=0, description="micrometres")]
SquareMicrons = Annotated[float, Field(ge=0, description="square micrometres")]
Pixels = Annotated[int, Field(gt=0, description="pixels")]
Fraction = Annotated[float, Field(ge=0, le=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DemoConfig(_Section):
    """The demo cohort: slides assembled from real LC25000 tiles in a simulated layout."""

    seed: int = 7
    source_dir: str | None = Field(
        default=None, description="LC25000 tiles with labels.csv; None = the copy bundled in the repository's data/"
    )
    out_dir: str = "data/demo"
    cohort: str = "demo"  # the training cohort the demo's slides are ingested into
    n_patients: Annotated[int, Field(ge=2)] = 22
    matched_normal_fraction: Fraction = 0.8
    luad_fraction: Fraction = 0.5
    canvas_cells: tuple[Pixels, Pixels] = (10, 13)  # rows, cols of source-tile cells
    tile_um: Microns = 112.0  # physical size of one 224 px LC25000 tile by convention
    tumour_fraction: tuple[Fraction, Fraction] = (0.1, 0.7)  # tumour slides with a larger region
    small_focus_share: Fraction = 0.35  # share of tumour slides whose tumour is one small focus
    small_focus_fraction: tuple[Fraction, Fraction] = (0.02, 0.05)  # of the tissue (at least one tile)
    sites: tuple[str, ...] = ("HC", "HK", "HM", "HR", "HW")  # made-up TCGA tissue-source-site codes
    stain_site_angle: Annotated[float, Field(ge=0, le=30)] = 10.0  # degrees: most a site turns its H or E vector
    # range of a site's stretch of each stain's concentration (log-uniform)
    stain_site_scale: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (0.7, 1.4)
    stain_slide_angle: Annotated[float, Field(ge=0, le=30)] = 2.0  # per-slide jitter on top of the site's stain
    stain_slide_scale: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (0.93, 1.07)
    white_balance: bool = True  # remove each LC25000 class's own white point (each was photographed apart)
    fraction_40x: Fraction = 0.25
    fraction_generic_tiff: Fraction = 0.15
    jpeg_quality: Annotated[int, Field(ge=10, le=100)] = 85
    mask_mpp: MicronsPerPixel = 8.0
    expression_noise_sd: Annotated[float, Field(ge=0)] = 0.3

    @model_validator(mode="after")
    def _check(self) -> DemoConfig:
        for name in ("tumour_fraction", "small_focus_fraction", "stain_site_scale", "stain_slide_scale"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"demo.{name}: lower bound {lo} is above upper bound {hi}")
        if self.fraction_40x + self.fraction_generic_tiff > 1:
            raise ValueError("demo.fraction_40x + demo.fraction_generic_tiff must not exceed 1")
        bad = [s for s in self.sites if not (len(s) == 2 and s.isascii() and s.isalnum() and s == s.upper())]
        if not self.sites or bad or len(set(self.sites)) != len(self.sites):
            raise ValueError(f"demo.sites: needs distinct two-character upper-case codes (TCGA TSS), got {self.sites}")
        return self


class IngestConfig(_Section):
    """Slide registration: which mpp values are believable and how hard to probe a file."""

    plausible_mpp: tuple[MicronsPerPixel, MicronsPerPixel] = (0.05, 20.0)
    max_anisotropy: Annotated[float, Field(ge=0)] = 0.05  # |mpp_x - mpp_y| / mpp_x above this fails
    probe_reads: bool = True  # decode the corners of level 0 and the smallest level to catch truncated files
    cohort: str = "default"  # cohort of slides ingested without --cohort or a manifest cohort column
    extensions: tuple[str, ...] = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif")
    # `histcode ingest --gdc`: FFPE diagnostic slides (DX), frozen sections (TS/BS/MS) or all
    gdc_slide_type: Literal["dx", "frozen", "all"] = "dx"


class CohortsConfig(_Section):
    """Which cohorts the training stages read, and where `histcode predict` registers new slides."""

    train: tuple[str, ...] = ()  # cohorts pretraining, labels and heads read; () = every training cohort
    predict: str = "inference"  # the inference cohort of `histcode predict` (never trained on)


class TissueMaskConfig(_Section):
    """Tissue detection on a low-resolution rendering: saturation, median blur, Otsu, close, area filters."""

    mpp: MicronsPerPixel = 8.0  # resolution the mask is computed at (16x coarser than 0.5 um/px)
    median_kernel: Pixels = 5  # at mask resolution; odd
    otsu_on_log: bool = True  # Otsu on log saturation: separates pale tissue from glass next to dark tumour
    min_saturation: Fraction = 0.06  # floor on the Otsu threshold so a blank slide yields no tissue
    max_saturation: Fraction = 1.0
    min_glass_fraction: Fraction = 0.02  # below this share of glass-like pixels, Otsu is not trusted (all tissue)
    close_kernel: Pixels = 5
    min_component_um2: SquareMicrons = 40_000.0  # tissue pieces smaller than this are dropped
    max_hole_um2: SquareMicrons = 40_000.0  # holes smaller than this are filled

    @model_validator(mode="after")
    def _odd(self) -> TissueMaskConfig:
        if self.median_kernel % 2 == 0:
            raise ValueError(f"tiling.mask.median_kernel must be odd, got {self.median_kernel}")
        return self


class TileQCConfig(_Section):
    """Optional per-tile pixel QC (reads every candidate tile, so it costs one read per tile)."""

    enabled: bool = False
    white_threshold: Annotated[int, Field(ge=0, le=255)] = 220
    max_white_fraction: Fraction = 0.6
    min_laplacian_var: Annotated[float, Field(ge=0)] = 15.0


class TilingConfig(_Section):
    """The tiling spec. Everything that changes which tiles exist is part of the spec hash."""

    tile_px: Pixels = 256
    target_mpp: MicronsPerPixel = 0.5
    min_tissue_fraction: Fraction = 0.5
    mask: TissueMaskConfig = TissueMaskConfig()
    qc: TileQCConfig = TileQCConfig()
    # run-time knobs (not part of the spec): where to compute, how many slide processes
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: Annotated[int, Field(ge=1)] = 1

    def spec_dict(self) -> dict:
        """The fields that define which tiles a slide gets (run-time knobs excluded)."""
        return self.model_dump(exclude={"device", "workers"}, mode="json")


class AugmentConfig(_Section):
    """Two views per tile, generated on the device by kornia. Probabilities are per image."""

    crop_scale: tuple[Fraction, Fraction] = (0.2, 1.0)  # random resized crop, share of the tile's area
    hflip_p: Fraction = 0.5
    vflip_p: Fraction = 0.5
    rot90_p: Fraction = 0.5  # a random multiple of 90 degrees
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    color_jitter_p: Fraction = 0.0  # off: after stain normalisation colour (the H/E balance) is information
    grayscale_p: Fraction = 0.0
    blur_p: Fraction = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels of a 224 px image, scaled with image_px
    stain_p: Fraction = 0.8  # H&E stain jitter in optical-density space: the stain robustness
    stain_scale: Annotated[float, Field(ge=0, le=1)] = 0.5  # stain concentrations scaled by U(1 - s, 1 + s)
    stain_shift: Annotated[float, Field(ge=0, le=1)] = 0.1  # ... and shifted by U(-s, s) OD units

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        if self.crop_scale[0] > self.crop_scale[1] or self.blur_sigma[0] > self.blur_sigma[1]:
            raise ValueError("pretrain.augment: ranges must be (low, high)")
        return self


class ProbeConfig(_Section):
    """Linear probe on held-aside labelled tiles: frozen embeddings -> logistic regression, grouped CV; once on
    the tiles as they are and once on the same tiles re-stained (a random stain per tile, in OD space)."""

    enabled: bool = True
    source_dir: str | None = None  # LC25000 with labels.csv; None = the bundled copy
    split: str = "val"
    folds: Annotated[int, Field(ge=2)] = 5
    max_iter: Pixels = 2000
    stain_log_sd: Annotated[float, Field(ge=0)] = 0.5  # re-staining: log-normal stretch of H and E concentrations
    stain_angle: Annotated[float, Field(ge=0, le=45)] = 10.0  # ... and turns of each stain vector, degrees (at most)


class StainNormConfig(_Section):
    """Stain normalisation of every slide tile an encoder sees (pretraining, embedding): Macenko et al. (2009),
    estimated once per slide from a sample of its tiles, mapped onto Macenko's reference stain. Recorded with
    the encoder, so its feature views read tiles the same way (loose tiles are read as they are)."""

    method: Literal["macenko", "none"] = "macenko"
    sample_tiles: Annotated[int, Field(ge=1)] = 24  # tiles per slide the stain is estimated from (evenly spread)
    beta: Annotated[float, Field(gt=0)] = 0.15  # OD norm a pixel must exceed to count as stained
    alpha: Annotated[float, Field(gt=0, lt=50)] = 1.0  # percentile of the extreme angles (robust extremes)


class PretrainConfig(_Section):
    """Contrastive pretraining. Defaults fit the demo on a 2-core CPU; the paper's AdCo: encoder resnet50_l3,
    image_px 224, batch_size 256, bank_size 65536, epochs 200."""

    method: Literal["adco", "moco", "simclr"] = "adco"
    encoder: str = "resnet18_l3"
    init: Literal["random", "imagenet"] = "random"
    image_px: Pixels = 112
    batch_size: Annotated[int, Field(ge=2)] = 64
    epochs: Annotated[float, Field(gt=0)] = 2.0
    max_steps: Annotated[int, Field(ge=1)] | None = None  # overrides epochs
    lr: Annotated[float, Field(gt=0)] = 0.06
    momentum: Fraction = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    warmup_steps: Annotated[int, Field(ge=0)] = 5
    proj_dim: Pixels = 128
    temperature: Annotated[float, Field(gt=0)] | None = None  # None = the method's: simclr 0.2, moco 0.2, adco 0.12
    key_momentum: Fraction = 0.999
    queue_size: Pixels = 4096  # MoCo (paper 65536)
    bank_size: Pixels = 1024  # AdCo (paper 65536)
    bank_temperature: Annotated[float, Field(gt=0)] = 0.02
    bank_lr: Annotated[float, Field(gt=0)] = 3.0
    bank_momentum: Fraction = 0.9
    bank_weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    symmetric: bool = False  # also use (view 2, view 1) as a query/key pair (AdCo's --sym)
    shuffle_bn: bool = True  # MoCo/AdCo: keys on a shuffled batch (across processes; split batch norm on one device)
    bn_splits: Pixels = 8  # sub-batches of batch norm on one device (shuffle_bn); lowered to divide the batch
    bank_init: Literal["train", "keys"] = "train"  # AdCo: the authors' warm-up that trains while it fills the bank, or keys only
    locality_chunk: Pixels = 1  # >1: shuffle runs of this many neighbouring tiles (stored JPEG tiles decoded once)
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 with a grad scaler)
    checkpoint_every: Pixels = 25
    log_every: Pixels = 5
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"  # DataLoader reader processes
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    register_as: str = "histcode-encoder"
    exclude_test_folds: tuple[Annotated[int, Field(ge=0)], ...] = ()  # patients of these label-set folds are left out
    augment: AugmentConfig = AugmentConfig()
    stain_norm: StainNormConfig = StainNormConfig()
    probe: ProbeConfig = ProbeConfig()

    def method_temperature(self) -> float:
        return self.temperature if self.temperature is not None else {"simclr": 0.2, "moco": 0.2, "adco": 0.12}[self.method]


class FeaturesConfig(_Section):
    """Materialising embeddings into LanceDB feature views, and searching them."""

    encoder: str = "histcode-encoder@adco"  # registered model: name@alias, name/version or name (latest)
    batch_size: Pixels = 64
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    commit_every_slides: Pixels = 8  # slides per Lance commit
    attribute_columns: tuple[str, ...] = ("sample_type", "subtype")  # slide attributes copied into the tables
    index_min_rows: Pixels = 100_000  # build an ANN index once a table holds this many vectors
    optimize_every_rows: Pixels = 100_000  # compact and update indices once this many rows are unindexed ...
    optimize_max_fragments: Pixels = 64  # ... or a table has more fragments than this
    index_type: Literal["IVF_PQ", "IVF_HNSW_SQ", "IVF_HNSW_FLAT", "IVF_FLAT"] = "IVF_HNSW_SQ"
    index_partitions: Annotated[int, Field(ge=1)] | None = None  # None = index_partition_scale * sqrt(rows)
    # chosen by benchmarks/search.py at 1M real-statistics vectors (the default encoder's; see the README)
    index_partition_scale: Annotated[float, Field(gt=0)] = 0.064
    index_subvector_dims: Pixels = 16  # IVF_PQ: dimensions per one-byte sub-vector code
    nprobes: Pixels = 8  # partitions searched per query
    refine_factor: Annotated[int, Field(ge=1)] | None = 2  # re-rank k * this candidates on the stored vectors
    hnsw_ef: Annotated[int, Field(ge=1)] | None = 100  # IVF_HNSW_*: candidates kept per partition; None = Lance's
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # on CUDA: autocast (bf16 where supported, else fp16) and channels-last batches
    workers: Annotated[int, Field(ge=1)] = 1  # processes the slides are sharded over (Prefect on Dask; 1 = in process)


DEFAULT_PANEL = (
    "SFTPC", "NKX2-1", "NAPSA", "KRT5", "TP63", "SOX2", "MKI67", "TOP2A", "CDKN2A", "EGFR", "TP53",
    "KRAS", "STK11", "KEAP1", "PIK3CA",
)


class GdcLabelsSource(_Section):
    """A GDC RNA-seq download as the labels' source (what `histcode labels ingest --gdc` takes on the command
    line), so `dvc repro`, the flows and the demo ingest it too. Paths relative to the workspace."""

    sheet: str  # the cart's sample sheet (TSV)
    dir: str  # the folder gdc-client wrote: one folder per file UUID
    clinical: str | None = None  # GDC's clinical TSV: the subtype of each patient from project_id
    subtype_column: str | None = None  # take the subtype from this clinical column instead


class LabelsConfig(_Section):
    """Expression labels: the matrix, its unit, the driver-gene panel, DE thresholds and the gate's limits."""

    expression: str = "data/demo/expression.tsv"  # genes x samples; .tsv, .csv or .parquet
    sample_sheet: str | None = None  # CSV: sample_id, patient_id[, slide_id, sample_type]; else TCGA barcode rules
    unit: Literal["TPM", "FPKM", "counts"] = "TPM"  # counts are scaled to counts per million before fold changes
    # GDC downloads (`histcode labels ingest --gdc`): the STAR counts column read (its unit sets `unit`: tpm_* TPM,
    # fpkm_* FPKM, the count columns counts) and whether genes are named by symbol or by Ensembl id without version
    gdc_unit: Literal["unstranded", "stranded_first", "stranded_second", "tpm_unstranded", "fpkm_unstranded",
                      "fpkm_uq_unstranded"] = "tpm_unstranded"
    gdc_genes: Literal["symbol", "ensembl"] = "symbol"
    gdc: GdcLabelsSource | None = None  # set: labels come from this GDC download, not from `expression`
    # a sample that cannot be used (no tiled slide of its patient and type, not a tissue normal, a second aliquot of
    # a labelled slide, ...): "fail" keeps it, and the gate fails naming it; "drop" leaves it out of the label set,
    # listed with its reason in metrics/labels.json (a GDC cart usually holds RNA of patients without slides)
    unmatched: Literal["fail", "drop"] = "fail"
    pseudo_count: Annotated[float, Field(gt=0)] = 1.0
    up_log2fc: Annotated[float, Field(gt=0)] = 1.0  # log2FC >= this: up
    down_log2fc: Annotated[float, Field(lt=0)] = -1.0  # log2FC <= this: down
    panel: tuple[str, ...] = DEFAULT_PANEL
    min_class_size: Annotated[int, Field(ge=1)] = 3  # patients per class, per gene and per slide task
    max_expression: Annotated[float, Field(gt=0)] = 1e9  # values above are implausible for the unit (and inf)
    # panel genes expected to carry no morphological signal, scored apart and left out of model choice; the default
    # is the demo's (its expression model gives these none: data/demo/genes.csv); [] where a cohort has no controls
    control_genes: tuple[str, ...] = ("KRAS", "STK11", "KEAP1", "PIK3CA")
    folds: Annotated[int, Field(ge=2)] = 5  # the cross-validation the heads will use, planned here
    seed: int = 0


class HeadsConfig(_Section):
    """Slide-level heads trained by patient-level cross-validation on a feature view."""

    tasks: tuple[Literal["tumor", "subtype", "de"], ...] = ("tumor", "subtype", "de")
    # guided: subtype and DE read from slide vectors pooled by the tumour head's attention (histcode.heads.guided)
    aggregators: tuple[Literal["attention", "mean", "max", "guided"], ...] = ("attention", "mean", "max", "guided")
    de_mode: Literal["multitask", "per_gene"] = "multitask"  # per_gene: the paper's one regression per gene
    epochs: Pixels = 40
    min_epochs: Pixels = 10  # no early stopping before this many epochs
    patience: Pixels = 8  # early stopping on the validation split of the training folds
    lr: Annotated[float, Field(gt=0)] = 2e-4  # Adam, CLAM's default
    bags_per_step: Pixels = 1  # bags whose mean loss makes one optimiser step (CLAM: 1; more on a GPU)
    weight_decay: Annotated[float, Field(ge=0)] = 1e-5
    # tile features centred on the training bags' mean and scaled (inside the model): by one global sd, which keeps
    # the features' geometry, or per feature (z-scores), or not at all
    standardise: Literal["global", "feature", "none"] = "global"
    balanced_sampling: bool = True  # each epoch draws bags class-balanced (CLAM's weighted sampler)
    k_sample: Pixels = 8  # CLAM instance clustering: top and bottom k attended tiles
    bag_weight: Fraction = 0.7
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2  # patients of each training fold held out for stopping
    bootstrap: Pixels = 1000  # resamples for 95% confidence intervals
    tumour_fraction_bins: tuple[Fraction, ...] = (0.05, 0.2)  # tumour AUC reported per bin (slide attribute tumour_fraction)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    view: str | None = None  # feature view id; None = the default view (features.encoder under the current tiling)
    register_models: bool = True
    promote: bool = False  # move the production aliases to this run's versions even where they score worse


class OODConfig(_Section):
    """How far a predicted slide's tiles lie from the training cohort's, in the heads' feature view: the mean
    cosine distance of each tile to its k nearest training tiles, averaged over the slide's tiles, against the
    same score of every training slide left out by patient (its own patient's tiles removed from the reference)."""

    enabled: bool = True
    k: Annotated[int, Field(ge=1)] = 10
    reference_tiles: Annotated[int, Field(ge=10)] = 20_000  # training tiles sampled as the reference
    tiles_per_slide: Annotated[int, Field(ge=1)] = 256  # tiles of a slide that are scored (sampled above this)
    calibration_slides: Annotated[int, Field(ge=2)] = 200  # training slides scored leave-one-patient-out
    quantile: Fraction = 0.99  # slides above this quantile of the calibration scores ...
    margin: Annotated[float, Field(ge=1)] = 1.1  # ... times this margin are flagged out of distribution
    seed: int = 0


class PredictConfig(_Section):
    """`histcode predict`: how new slides are scored."""

    ood: OODConfig = OODConfig()


class HistcodeConfig(_Section):
    demo: DemoConfig = DemoConfig()
    cohorts: CohortsConfig = CohortsConfig()
    ingest: IngestConfig = IngestConfig()
    tiling: TilingConfig = TilingConfig()
    pretrain: PretrainConfig = PretrainConfig()
    features: FeaturesConfig = FeaturesConfig()
    labels: LabelsConfig = LabelsConfig()
    heads: HeadsConfig = HeadsConfig()
    predict: PredictConfig = PredictConfig()


class ConfigError(ValueError):
    """params.yaml is missing a section's shape, has unknown keys or bad values."""


def load_config(path: Path | None) -> HistcodeConfig:
    """Read params.yaml, or the defaults when ``path`` is None or does not exist. Raises ConfigError naming
    the file and the offending key."""
    if path is None or not Path(path).exists():
        return HistcodeConfig()
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return HistcodeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def stable_hash(payload: object, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable payload with sorted keys (identical input -> identical id)."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
