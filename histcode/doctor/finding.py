"""One check's result, as every doctor module returns it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

Status = Literal["ok", "warn", "fail"]
OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Finding:
    """One check's result: ``item`` names what was checked (a store, a slide, an encoder version), ``detail``
    what was found, ``fix`` what to do about it (None when nothing is to be done)."""

    area: str
    item: str
    status: Status
    detail: str
    fix: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def failed(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.status == FAIL]

