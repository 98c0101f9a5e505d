"""Sections of the slide stages: the demo cohort, ingestion, cohorts, tissue detection and tiling."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from histcode.config.base import Fraction, Microns, MicronsPerPixel, Pixels, SquareMicrons, _Section  # noqa: F401


class DemoConfig(_Section):
    """The demo cohort: slides assembled from real LC25000 tiles in a simulated layout."""

    seed: int = 7
    source_dir: str | None = Field(
        default=None, description="LC25000 tiles with labels.csv; None = the copy bundled in the repository's data/"
    )
    out_dir: str = "data/demo"
    source_split: str = "train"  # the split of the source tiles the slides are composed of (val: held-aside slides)
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
    # simulated overall survival (histcode.demo.survival): Weibull times whose log-hazard rises with the patient's
    # tumour fraction and for LUSC, censored at a staggered end of follow-up; written as a GDC clinical TSV
    survival_median_days: Annotated[float, Field(gt=0)] = 4000.0  # median survival of a patient with no tumour
    survival_shape: Annotated[float, Field(gt=0)] = 1.5  # Weibull shape (> 1: hazard rising with time)
    survival_tumour_log_hazard: float = 3.0  # log hazard ratio per unit of tumour fraction (0 -> 1)
    survival_lusc_log_hazard: float = 0.5  # log hazard ratio of LUSC against LUAD
    survival_follow_up_days: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (730.0, 2555.0)

    @model_validator(mode="after")
    def _check(self) -> DemoConfig:
        for name in ("tumour_fraction", "small_focus_fraction", "stain_site_scale", "stain_slide_scale",
                     "survival_follow_up_days"):
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
    """Slide registration: which mpp values are believable, the cohort's fallback scale, how hard to probe a file
    and which files a directory scan takes (see docs/ingest.md, Formats)."""

    plausible_mpp: tuple[MicronsPerPixel, MicronsPerPixel] = (0.05, 20.0)
    max_anisotropy: Annotated[float, Field(ge=0)] = 0.05  # |mpp_x - mpp_y| / mpp_x above this fails
    # um/px of slides whose files carry no usable scale and that got no --mpp or manifest mpp (mpp_source "params")
    default_mpp: MicronsPerPixel | None = None
    probe_reads: bool = True  # decode the corners of level 0 and the smallest level to catch truncated files
    cohort: str = "default"  # cohort of slides ingested without --cohort or a manifest cohort column
    # files a directory scan takes; DICOM series folders and formats refused by name are found besides these
    extensions: tuple[str, ...] = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
                                   ".czi", ".avs")
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
