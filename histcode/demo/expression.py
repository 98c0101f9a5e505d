"""A TCGA-style expression matrix whose values follow each slide's composition and its tumour's pixels.

log2(TPM + 1) of gene g in a sample = base_g + effects_g . composition + pixels_g . (t * z) + patient_g + noise,
where composition is (adenocarcinoma, squamous, any tumour) as fractions t of the slide's tissue, and z holds
measures of the tumour tiles actually placed on the slide (nuclear density and nuclear area from their
haematoxylin channel, ``histcode.demo.pixels``), in standard deviations of their LC25000 class: a bulk sample
mixes tumour and benign cells, so the tumour's own programme scales with its share t. Patients' tumour pools
differ in these measures, so the genes that read them carry information that subtype and tumour fraction do
not, and an encoder that sees nuclei predicts them better than one that sees colour. Genes with all-zero
effects carry no morphological signal: their tumour/normal differences are patient-level noise that no image
can predict. All of it is simulated; only the pixels are real.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class GeneModel:
    gene: str
    role: str  # driver | marker | housekeeping
    base: float  # log2(TPM + 1) in benign lung
    aca: float  # log2 change per unit adenocarcinoma fraction
    scc: float  # log2 change per unit squamous fraction
    tumour: float  # log2 change per unit tumour fraction (either subtype)
    nuclear_density: float = 0.0  # log2 change per unit of tumour fraction x the tumour's density z-score
    nuclear_area: float = 0.0  # the same for the tumour's mean nuclear area
    patient_sd: float = 0.25  # between-patient spread shared by a patient's samples
    tumour_sd: float = 0.0  # extra tumour-only spread (signal without morphology)

    @property
    def morphological_signal(self) -> bool:
        return any(abs(v) > 0 for v in (self.aca, self.scc, self.tumour, self.nuclear_density, self.nuclear_area))


PANEL: tuple[GeneModel, ...] = (
    GeneModel("SFTPC", "marker", 11.0, 0.0, 0.0, -5.0),  # alveolar type II; lost in tumour
    GeneModel("NKX2-1", "driver", 5.0, 3.0, -1.5, 0.0),  # LUAD lineage driver (amplified)
    GeneModel("NAPSA", "marker", 7.0, 2.0, -2.5, 0.0),
    GeneModel("KRT5", "marker", 3.0, 0.0, 6.0, 0.0),  # squamous basal keratin
    GeneModel("TP63", "driver", 2.5, 0.0, 4.5, 0.0),  # LUSC lineage
    GeneModel("SOX2", "driver", 3.0, 0.0, 3.5, 0.0),  # amplified in LUSC
    GeneModel("MKI67", "marker", 2.0, 0.0, 0.0, 1.5, nuclear_density=2.5),  # proliferation: cellularity
    GeneModel("TOP2A", "marker", 2.5, 0.0, 0.0, 1.5, nuclear_density=2.5),
    GeneModel("CDKN2A", "driver", 3.0, 0.0, 0.0, 1.0, nuclear_area=2.5),  # large, pleomorphic nuclei
    GeneModel("EGFR", "driver", 5.0, 1.5, 0.5, 0.0, nuclear_density=-1.0),
    GeneModel("TP53", "driver", 5.5, 0.0, 0.0, 0.5, nuclear_area=1.5),
    GeneModel("KRAS", "driver", 5.0, 0.0, 0.0, 0.0, tumour_sd=0.9),  # mutations, no expression-morphology link
    GeneModel("STK11", "driver", 5.0, 0.0, 0.0, 0.0, tumour_sd=0.9),
    GeneModel("KEAP1", "driver", 5.5, 0.0, 0.0, 0.0, tumour_sd=0.9),
    GeneModel("PIK3CA", "driver", 4.5, 0.0, 0.0, 0.0, tumour_sd=0.9),
    GeneModel("GAPDH", "housekeeping", 10.0, 0.0, 0.0, 0.0),
    GeneModel("ACTB", "housekeeping", 10.5, 0.0, 0.0, 0.0),
)


@dataclass(frozen=True)
class SampleSpec:
    barcode: str  # TCGA-style aliquot barcode
    patient_id: str
    tumour: bool
    aca_fraction: float  # of the slide's tissue
    scc_fraction: float
    nuclear_density_z: float = 0.0  # the slide's tumour tiles, in sd of their class (0: no tumour)
    nuclear_area_z: float = 0.0


def simulate_expression(samples: list[SampleSpec], rng: np.random.Generator, noise_sd: float) -> pd.DataFrame:
    """Genes x samples TPM matrix (index ``gene``), rounded to 3 decimals."""
    patients = sorted({s.patient_id for s in samples})
    patient_effect = {p: {g.gene: rng.normal(0, g.patient_sd) for g in PANEL} for p in patients}
    columns = {}
    for s in samples:
        values = []
        for g in PANEL:
            tumour_fraction = s.aca_fraction + s.scc_fraction
            log2 = g.base + g.aca * s.aca_fraction + g.scc * s.scc_fraction + g.tumour * tumour_fraction
            log2 += tumour_fraction * (g.nuclear_density * s.nuclear_density_z + g.nuclear_area * s.nuclear_area_z)
            log2 += patient_effect[s.patient_id][g.gene] + rng.normal(0, noise_sd)
            if s.tumour and g.tumour_sd:
                log2 += rng.normal(0, g.tumour_sd)
            values.append(max(0.0, 2.0 ** log2 - 1.0))
        columns[s.barcode] = np.round(values, 3)
    return pd.DataFrame(columns, index=pd.Index([g.gene for g in PANEL], name="gene"))


def panel_table() -> pd.DataFrame:
    """The simulation's ground truth per gene, for documentation and for checking what a head learned."""
    return pd.DataFrame(
        [
            {
                "gene": g.gene, "role": g.role, "morphological_signal": g.morphological_signal, "base_log2tpm": g.base,
                "effect_aca": g.aca, "effect_scc": g.scc, "effect_tumour": g.tumour,
                "effect_nuclear_density": g.nuclear_density, "effect_nuclear_area": g.nuclear_area,
                "tumour_only_sd": g.tumour_sd,
            }
            for g in PANEL
        ]
    )
