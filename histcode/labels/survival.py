"""Survival labels per patient from a clinical table: a GDC clinical TSV, or a plain table of time and event.

- **GDC clinical TSV** (the portal's clinical export, ``clinical.tsv``: one row per case and diagnosis,
  treatment or follow-up; ``'--`` is missing): overall survival, as the TCGA-CDR defines it from these fields:
  event = ``vital_status`` is ``Dead``; time = ``days_to_death`` for the dead, ``days_to_last_follow_up`` for the
  living. Of a case's several rows the death is taken (its ``days_to_death`` must agree across the rows that
  give one) or, for the living, the largest follow-up.
- **Another endpoint by column** (``time_column`` and ``event_column``, e.g. progression-free interval): the
  time in that column, the event in that one (``1``/``0``, ``true``/``false``, ``yes``/``no``, ``Dead``/``Alive``,
  ``event``/``censored``); rows of one patient must agree.
- **A plain CSV** ``patient_id,time,event``: the same, with those columns.

The patient is ``case_submitter_id`` (or ``cases.submitter_id``, or ``patient_id``). Times are days, finite and
>= 0. Every problem raises ``SurvivalFileError`` naming the file, the line and the patient: a negative or
non-numeric time, an event that is none of the above, a dead patient with no ``days_to_death``, rows of one
patient that disagree. Patients with no follow-up at all (no vital status, no time) are left out and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from histcode.labels.expression import ExpressionFileError, check_utf8
from histcode.labels.gdc import CLINICAL_MISSING, CLINICAL_PATIENT

log = logging.getLogger(__name__)

PATIENT_COLUMNS = (*CLINICAL_PATIENT, "patient_id")
VITAL, DEATH, FOLLOW_UP = "vital_status", "days_to_death", "days_to_last_follow_up"
EVENT_WORDS = {"1": 1, "0": 0, "true": 1, "false": 0, "yes": 1, "no": 0, "dead": 1, "alive": 0, "event": 1,
               "censored": 0, "deceased": 1, "living": 0}
COLUMNS = ["patient_id", "time", "event", "source"]


class SurvivalFileError(ExpressionFileError):
    """A clinical table that cannot give survival labels; the message names the file, line and patient."""


@dataclass
class SurvivalLabels:
    frame: pd.DataFrame  # patient_id, time (days), event (0/1), source (what the labels were read as)
    endpoint: str  # overall_survival | <time column>/<event column>
    no_follow_up: list[str] = field(default_factory=list)  # patients left out: no vital status or time at all

    @property
    def n_events(self) -> int:
        return int(self.frame.event.sum()) if len(self.frame) else 0


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise SurvivalFileError(f"clinical table {path}: file not found")
    try:
        check_utf8(path, "the clinical table")
    except ExpressionFileError as exc:
        raise SurvivalFileError(str(exc)) from exc
    try:
        with path.open(encoding="utf-8") as fh:
            first = fh.readline()
        sep = "\t" if "\t" in first else ","
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, OSError) as exc:
        raise SurvivalFileError(f"clinical table {path}: not a readable TSV or CSV: {exc}") from exc


def _missing(value: str) -> bool:
    return value.strip() in CLINICAL_MISSING


def _days(path: Path, line: int, patient: str, column: str, value: str) -> float:
    try:
        days = float(value)
    except ValueError:
        raise SurvivalFileError(f"clinical table {path}, line {line}: patient {patient}: {column} {value!r} is not "
                                "a number of days") from None
    if not np.isfinite(days) or days < 0:
        raise SurvivalFileError(f"clinical table {path}, line {line}: patient {patient}: {column} {value!r} is "
                                "negative or not finite (times are days from diagnosis, >= 0)")
    return days


def _event(path: Path, line: int, patient: str, column: str, value: str) -> int:
    word = value.strip().lower()
    if word not in EVENT_WORDS:
        raise SurvivalFileError(f"clinical table {path}, line {line}: patient {patient}: {column} {value!r} is not "
                                "an event (1/0, true/false, yes/no, Dead/Alive)")
    return EVENT_WORDS[word]


def has_survival_columns(path: Path, time_column: str | None = None, event_column: str | None = None) -> bool:
    """Whether the clinical table at ``path`` carries survival: the named time/event columns (which must then be
    there: SurvivalFileError otherwise), else GDC's vital_status, else ``time`` and ``event``."""
    columns = set(_read_table(path).columns)
    if time_column is not None or event_column is not None:
        need = [c for c in (time_column, event_column) if c is not None and c not in columns]
        if need:
            raise SurvivalFileError(f"clinical table {path}: lacks the survival column(s) {need}")
        return True
    return VITAL in columns or {"time", "event"} <= columns


def read_survival(path: Path, time_column: str | None = None, event_column: str | None = None) -> SurvivalLabels:
    """Survival labels of every patient of the clinical table at ``path`` (see the module's docstring)."""
    if (time_column is None) != (event_column is None):
        raise SurvivalFileError("survival endpoint: give both a time column and an event column, or neither")
    frame = _read_table(path)
    patient = next((c for c in PATIENT_COLUMNS if c in frame.columns), None)
    if patient is None:
        raise SurvivalFileError(f"clinical table {path}: no patient column (one of {', '.join(PATIENT_COLUMNS)})")
    if time_column is None and {"time", "event"} <= set(frame.columns) and VITAL not in frame.columns:
        time_column, event_column = "time", "event"
    if time_column is not None:
        need = [c for c in (time_column, event_column) if c not in frame.columns]
        if need:
            raise SurvivalFileError(f"clinical table {path}: lacks the column(s) {need}")
        return _by_columns(path, frame, patient, time_column, event_column)
    need = [c for c in (VITAL, DEATH, FOLLOW_UP) if c not in frame.columns]
    if need:
        raise SurvivalFileError(f"clinical table {path}: lacks the column(s) {need} for overall survival (GDC's "
                                "clinical export has vital_status, days_to_death, days_to_last_follow_up), or give "
                                "a time and an event column")
    return _overall_survival(path, frame, patient)


def _overall_survival(path: Path, frame: pd.DataFrame, patient: str) -> SurvivalLabels:
    status: dict[str, tuple[str, int]] = {}  # patient -> (vital status, its first line)
    death: dict[str, tuple[float, int]] = {}
    follow: dict[str, float] = {}
    order: dict[str, None] = {}  # patients in order of first appearance
    for line, row in enumerate(frame[[patient, VITAL, DEATH, FOLLOW_UP]].itertuples(index=False), start=2):
        pid, vital, died, seen = (str(v).strip() for v in row)
        if not pid:
            continue
        order.setdefault(pid)
        if not _missing(vital):
            if vital.lower() not in ("dead", "alive"):
                raise SurvivalFileError(f"clinical table {path}, line {line}: patient {pid}: vital_status {vital!r} "
                                        "is neither Dead nor Alive")
            if pid in status and status[pid][0] != vital.lower():
                raise SurvivalFileError(f"clinical table {path}, line {line}: patient {pid}: vital_status {vital!r}, "
                                        f"line {status[pid][1]} gives {status[pid][0].title()!r}")
            status.setdefault(pid, (vital.lower(), line))
        if not _missing(died):
            days = _days(path, line, pid, DEATH, died)
            if pid in death and death[pid][0] != days:
                raise SurvivalFileError(f"clinical table {path}, line {line}: patient {pid}: days_to_death {died}, "
                                        f"line {death[pid][1]} gives {death[pid][0]:g}")
            death.setdefault(pid, (days, line))
        if not _missing(seen):
            follow[pid] = max(follow.get(pid, 0.0), _days(path, line, pid, FOLLOW_UP, seen))
    rows, left_out = [], []
    for pid in order:
        vital = status.get(pid, (None, 0))[0]
        if vital == "dead":
            if pid not in death:
                raise SurvivalFileError(f"clinical table {path}, line {status[pid][1]}: patient {pid} is Dead but no "
                                        "row gives days_to_death")
            rows.append((pid, death[pid][0], 1))
        elif vital == "alive" and pid in follow:
            rows.append((pid, follow[pid], 0))
        else:
            left_out.append(pid)
    return _labels(path, rows, "overall_survival", left_out)


def _by_columns(path: Path, frame: pd.DataFrame, patient: str, time_column: str, event_column: str) -> SurvivalLabels:
    seen: dict[str, tuple[float, int, int]] = {}
    order, left_out = [], []
    for line, row in enumerate(frame[[patient, time_column, event_column]].itertuples(index=False), start=2):
        pid, time, event = (str(v).strip() for v in row)
        if not pid:
            continue
        if _missing(time) or _missing(event):
            if pid not in seen and pid not in left_out:
                left_out.append(pid)
            continue
        value = (_days(path, line, pid, time_column, time), _event(path, line, pid, event_column, event))
        if pid in seen and seen[pid][:2] != value:
            raise SurvivalFileError(f"clinical table {path}, line {line}: patient {pid}: ({time_column}, {event_column}) "
                                    f"= ({value[0]:g}, {value[1]}), line {seen[pid][2]} gives "
                                    f"({seen[pid][0]:g}, {seen[pid][1]})")
        if pid not in seen:
            order.append(pid)
        seen.setdefault(pid, (*value, line))
    left_out = [p for p in left_out if p not in seen]
    endpoint = "time/event" if (time_column, event_column) == ("time", "event") else f"{time_column}/{event_column}"
    return _labels(path, [(p, seen[p][0], seen[p][1]) for p in order], endpoint, left_out)


def _labels(path: Path, rows: list[tuple[str, float, int]], endpoint: str, left_out: list[str]) -> SurvivalLabels:
    frame = pd.DataFrame(rows, columns=["patient_id", "time", "event"]).assign(source=endpoint)
    frame = frame.astype({"time": float, "event": int})[COLUMNS]
    if left_out:
        log.warning("clinical table %s: %d patients have no follow-up (no vital status or time) and are left out of "
                    "the survival labels, e.g. %s", path, len(left_out), ", ".join(left_out[:3]))
    log.info("clinical table %s: %s of %d patients, %d events", path, endpoint, len(frame), int(frame.event.sum()))
    return SurvivalLabels(frame, endpoint, left_out)


def empty_survival() -> pd.DataFrame:
    """A survival labels frame without rows (no clinical table)."""
    return pd.DataFrame({"patient_id": pd.Series(dtype=str), "time": pd.Series(dtype=float),
                         "event": pd.Series(dtype=int), "source": pd.Series(dtype=str)})
