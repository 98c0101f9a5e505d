"""Sections of the stages after pretraining: feature views, expression labels, heads, prediction."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from histcode.config.base import Fraction, Microns, MicronsPerPixel, Pixels, SquareMicrons, _Section  # noqa: F401

Standardise = Literal["global", "feature", "scale", "none"]  # heads.standardise, per task or for all


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
    # chosen by benchmarks/search.py at 1M real-statistics vectors (the default encoder's; see docs/benchmarks.md)
    index_partition_scale: Annotated[float, Field(gt=0)] = 0.064
    index_subvector_dims: Pixels = 16  # IVF_PQ: dimensions per one-byte sub-vector code
    nprobes: Pixels = 8  # partitions searched per query
    refine_factor: Annotated[int, Field(ge=1)] | None = 2  # re-rank k * this candidates on the stored vectors
    hnsw_ef: Annotated[int, Field(ge=1)] | None = 100  # IVF_HNSW_*: candidates kept per partition; None = Lance's
    # filtered tile search (histcode.features.search.TileSearcher; chosen by benchmarks/search.py at 1M rows): a filter
    # keeping at most this many rows is searched exactly over them ...
    search_exact_rows: Annotated[int, Field(ge=0)] = 15_000
    # ... one keeping at least this fraction of the table through the index over every row, filtered after
    search_postfilter_fraction: Fraction = 0.2
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
    # panel genes expected to carry no morphological signal, scored apart and left out of model choice; resolved at
    # label ingest and stored with the label set: this list if given ([] = none), else the gene table's controls in
    # the panel (the demo's data/demo/genes.csv marks KRAS, STK11, KEAP1, PIK3CA), else none
    control_genes: tuple[str, ...] | None = None
    # a CSV (relative to the workspace) with a gene column and a control (true/false) or morphological_signal column
    # (control = no signal); None = genes.csv beside the expression matrix when there is one (the demo writes it)
    gene_table: str | None = None
    # what the folds group: site keeps each tissue-source site whole, every patient of a site in one fold (Howard et
    # al. 2021: a site's stain and population leak otherwise) | patient | auto (site when every labelled slide has a
    # site, a manifest column or TCGA's TSS, and there are at least as many sites as folds; else patient); the choice
    # and its reason are kept with the label set
    folds_by: Literal["auto", "patient", "site"] = "auto"
    folds: Annotated[int, Field(ge=2)] = 5  # the cross-validation the heads will use, planned here
    seed: int = 0
    # survival labels (histcode.labels.survival): a GDC clinical TSV (overall survival from vital_status,
    # days_to_death, days_to_last_follow_up) or a CSV patient_id,time,event; None = clinical.tsv beside the
    # expression matrix when there is one (the demo writes it); a GDC download's clinical TSV is read too
    clinical: str | None = None
    survival_time_column: str | None = None  # another endpoint: its time column (with survival_event_column) ...
    survival_event_column: str | None = None  # ... and its event column (1/0, true/false, Dead/Alive, yes/no)
    min_survival_events: Annotated[int, Field(ge=1)] = 5  # fewer events among the labelled patients: survival refused


class SurvivalHeadsConfig(_Section):
    """The survival task's heads (Cox partial likelihood): their own, shorter training, the linear Cox model's
    ridge penalty and the horizons of the time-dependent AUC."""

    epochs: Pixels = 20
    min_epochs: Pixels = 5
    patience: Pixels = 5
    bags_per_step: Annotated[int, Field(ge=2)] = 16  # bags per Cox risk set (a step); the fold's bags if fewer
    ridge: Annotated[float, Field(ge=0)] = 1.0  # the mean head: ridge / 2 * |w|^2 on standardised mean vectors
    horizons_days: tuple[Annotated[float, Field(gt=0)], ...] = (365.0, 730.0, 1095.0)  # time-dependent AUC at these


class HeadsConfig(_Section):
    """Slide-level heads trained by patient-level cross-validation on a feature view."""

    # survival: overall survival (Cox); skipped, with the reason, where the label gate refused it (no or too few
    # events) unless asked for by name
    tasks: tuple[Literal["tumor", "subtype", "de", "survival"], ...] = ("tumor", "subtype", "de", "survival")
    # guided: subtype and DE read from slide vectors pooled by the tumour head's attention (histcode.heads.guided)
    # attention_mb: CLAM_MB, one attention branch per class (multi-class tasks)
    aggregators: tuple[Literal["attention", "attention_mb", "mean", "max", "guided"], ...] = (
        "attention", "mean", "max", "guided")
    de_mode: Literal["multitask", "per_gene"] = "multitask"  # per_gene: the paper's one regression per gene
    epochs: Pixels = 40
    min_epochs: Pixels = 10  # no early stopping before this many epochs
    patience: Pixels = 8  # early stopping on the validation split of the training folds
    lr: Annotated[float, Field(gt=0)] = 2e-4  # Adam, CLAM's default
    bags_per_step: Pixels = 1  # bags whose mean loss makes one optimiser step (CLAM: 1; more on a GPU)
    weight_decay: Annotated[float, Field(ge=0)] = 1e-5
    # tile features standardised inside the torch heads, per task (one mode for all, or task -> mode): global =
    # centred on the training bags' mean and scaled by one sd (keeps the features' geometry); feature = z-scores;
    # scale = divided by that one sd, not centred; none. Centring costs the tumour head's attention its
    # localisation (out of fold vs the demo's masks, 3 seeds: 0.90 global, 0.94 scale) and the DE head keeps its
    # gene AUC only when centred, so the default is per task (docs/heads.md).
    standardise: Standardise | dict[Literal["tumor", "subtype", "de", "survival"], Standardise] = Field(
        default_factory=lambda: {"tumor": "scale", "subtype": "global", "de": "global"})
    balanced_sampling: bool = True  # each epoch draws bags class-balanced (CLAM's weighted sampler)
    k_sample: Pixels = 16  # CLAM instance clustering: top and bottom k attended tiles (at most half the bag)
    bag_weight: Fraction = 0.7
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2  # patients of each training fold held out for stopping
    # patients of each training fold held out to choose among aggregators: no head is fitted or stopped on them
    selection_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    bootstrap: Pixels = 1000  # resamples for 95% confidence intervals
    tumour_fraction_bins: tuple[Fraction, ...] = (0.05, 0.2)  # tumour AUC reported per bin (slide attribute tumour_fraction)
    # attention maps (heatmaps, tile scores, the viewer, attention vs mask) smoothed over the tile grid: each tile's
    # log-attention mixed with its neighbours' mean by this weight (Castro-Macias et al. 2024's Sm); 0 = raw
    attention_smoothing: Fraction = 0.5
    attention_smoothing_passes: Annotated[int, Field(ge=1, le=8)] = 2  # 2: each tile reads the tiles 2 cells away too
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    view: str | None = None  # feature view id; None = the default view (features.encoder under the current tiling)
    register_models: bool = True
    promote: bool = False  # move the production aliases to this run's versions even where they score worse
    survival: SurvivalHeadsConfig = SurvivalHeadsConfig()

    def standardise_for(self, task: str) -> str:
        """The standardisation of ``task``'s torch heads (``standardise``; a task the mapping omits: global)."""
        return self.standardise if isinstance(self.standardise, str) else self.standardise.get(task, "global")


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
    # how a patient's slides make its patient-level prediction (histcode.heads.patients): the mean or the maximum
    # of the slides' outputs, or one bag of all their tiles through the head; also used for the out-of-fold
    # patient rows of `histcode heads` (where `bag` pools by the mean: the fold models are not kept)
    patient_pooling: Literal["mean", "max", "bag"] = "mean"
