"""Simulated overall survival of the demo's patients, tied to their tumours' morphology, as a GDC clinical TSV.

Each patient's time to death is Weibull: S(t) = exp(-(t / lambda)^k * exp(eta)), with
eta = ``survival_tumour_log_hazard`` * the tumour fraction of its tumour slide (as composed, what the heads can
see) + ``survival_lusc_log_hazard`` for LUSC, k = ``survival_shape`` and lambda set so that a patient with no
tumour has the median ``survival_median_days``. Follow-up ends at a time drawn uniformly from
``survival_follow_up_days`` (staggered entry into a study that closes: administrative censoring); a patient alive
then is censored at it. Times are whole days.

The file is laid out as the GDC portal's clinical export (``clinical.tsv``): one row per case and treatment,
``'--`` for a missing value, the case's ``vital_status`` and ``days_to_death`` repeated on its rows and
``days_to_last_follow_up`` largest on its last row (the labels take a case's largest follow-up), so the demo
ingests it exactly as it would a real download. All of it is simulated.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from histcode.config import DemoConfig

MISSING = "'--"
TREATMENTS = ("Pharmaceutical Therapy, NOS", "Radiation Therapy, NOS")
CLINICAL_COLUMNS = ("case_id", "case_submitter_id", "project_id", "vital_status", "days_to_death",
                    "days_to_last_follow_up", "treatment_type")


def simulate_survival(slides: pd.DataFrame, cfg: DemoConfig, rng: np.random.Generator) -> pd.DataFrame:
    """One row per patient: patient_id, subtype, tumour_fraction, log_hazard, time (days), event (1 = death).
    ``slides``: the cohort's slides.csv rows (patient_id, sample_type, patient_subtype, tumour_fraction)."""
    tumour = slides[slides.sample_type == "tumor"].groupby("patient_id", sort=True).agg(
        subtype=("patient_subtype", "first"), tumour_fraction=("tumour_fraction", "mean")).reset_index()
    eta = (cfg.survival_tumour_log_hazard * tumour.tumour_fraction.to_numpy(dtype=float)
           + cfg.survival_lusc_log_hazard * (tumour.subtype == "LUSC").to_numpy(dtype=float))
    k = cfg.survival_shape
    scale = cfg.survival_median_days / np.log(2.0) ** (1.0 / k)
    u = rng.uniform(size=len(tumour))
    death = scale * (-np.log(u) / np.exp(eta)) ** (1.0 / k)
    lo, hi = cfg.survival_follow_up_days
    end = rng.uniform(lo, hi, size=len(tumour))
    event = death <= end
    time = np.maximum(1, np.round(np.where(event, death, end))).astype(int)
    return tumour.assign(log_hazard=np.round(eta, 4), time=time, event=event.astype(int))


def clinical_tsv(survival: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """The simulated survival as GDC's clinical export: two rows per case (one per treatment); the dead carry
    ``days_to_death`` on both and no follow-up, the living an earlier follow-up on the first row and their last
    on the second."""
    rows = []
    for r in survival.itertuples(index=False):
        case_id = f"{hash_id(r.patient_id):032x}"
        case_id = f"{case_id[:8]}-{case_id[8:12]}-{case_id[12:16]}-{case_id[16:20]}-{case_id[20:]}"
        earlier = int(rng.uniform(0.3, 0.9) * r.time)
        for i, treatment in enumerate(TREATMENTS):
            dead = bool(r.event)
            rows.append({"case_id": case_id, "case_submitter_id": r.patient_id, "project_id": f"TCGA-{r.subtype}",
                         "vital_status": "Dead" if dead else "Alive",
                         "days_to_death": str(int(r.time)) if dead else MISSING,
                         "days_to_last_follow_up": MISSING if dead else str(earlier if i == 0 else int(r.time)),
                         "treatment_type": treatment})
    return pd.DataFrame(rows, columns=list(CLINICAL_COLUMNS))


def hash_id(text: str) -> int:
    """A stable 128-bit number of ``text`` (Python's ``hash`` is salted per process)."""
    import hashlib

    return int(hashlib.sha256(text.encode()).hexdigest()[:32], 16)
