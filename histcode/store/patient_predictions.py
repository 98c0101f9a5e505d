"""The catalog's ``patient_predictions`` table: one prediction per patient, pooled from its slides'.

One row per (patient, head version, source, output), as ``predictions`` has per slide: ``source`` ``cv`` (pooled
from the out-of-fold slide rows) or ``predict`` (from `histcode predict`'s), ``pooling`` how the slides were
pooled (``histcode.heads.patients``), ``slide_ids`` which slides, ``n_slides`` how many. Rows go stale with their
task's ``@best``; the view ``current_patient_predictions`` keeps one row per (patient, output) by the same rule as
``current_predictions``. Writes replace a (patient, model, version, source)'s rows in one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from histcode.store.catalog import Catalog
from histcode.store.predictions import CURRENT_TEMPLATE, write_rows

COLUMNS = ("patient_id", "task", "model", "version", "source", "pooling", "output", "value", "call", "n_slides",
           "slide_ids", "stale", "predicted_at")

CURRENT_PATIENT_SQL = CURRENT_TEMPLATE.replace("{key}", "patient_id")


def write_patient_predictions(catalog: Catalog, frame: pd.DataFrame, current: Mapping[str, int] | None = None) -> int:
    """Store ``frame``'s rows (``COLUMNS`` but ``stale`` and ``predicted_at``), replacing what the same (patient,
    model, version, source) had; with ``current`` (task -> ``@best``'s version) other versions' rows go stale."""
    return write_rows(catalog, "patient_predictions", "patient_id", COLUMNS, frame, current)
