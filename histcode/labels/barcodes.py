"""TCGA barcode rules: which patient a sample or slide belongs to, and whether it is tumour or normal.

``TCGA-05-4244-01A-01R-1107-07``: project, tissue source site, participant (the first three fields are the
patient), then the sample field whose two digits are the sample type: 01-09 tumour, 10-19 normal, 20-29
control. Slide barcodes carry the same field (``TCGA-05-4244-01Z-00-DX1``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SAMPLE = re.compile(r"^(?P<patient>TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})-(?P<type>\d{2})(?P<vial>[A-Z])?", re.IGNORECASE)
PATIENT = re.compile(r"^TCGA-(?P<site>[A-Z0-9]{2})-[A-Z0-9]{4}(?:-|$)", re.IGNORECASE)  # any barcode's first fields

TUMOUR, NORMAL, CONTROL, UNKNOWN = "tumor", "normal", "control", "unknown"


@dataclass(frozen=True)
class Barcode:
    patient_id: str
    type_code: str  # the two digits
    kind: str  # tumor | normal | control


def parse_barcode(barcode: str) -> Barcode | None:
    """The patient and sample type of a TCGA sample, aliquot or slide barcode; None if it is not one."""
    match = SAMPLE.match(barcode.strip())
    if not match:
        return None
    code = int(match["type"])
    kind = TUMOUR if 1 <= code <= 9 else NORMAL if 10 <= code <= 19 else CONTROL
    return Barcode(match["patient"].upper(), match["type"], kind)


def tissue_source_site(barcode: str) -> str | None:
    """The tissue-source site (the two characters after ``TCGA-``) of a TCGA patient, sample or slide barcode
    (``TCGA-05-4244-01Z-00-DX1``: ``05``); None if it is not one."""
    match = PATIENT.match(barcode.strip())
    return match["site"].upper() if match else None
