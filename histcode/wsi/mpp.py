"""Which physical scale a slide is at: its own mpp, else its objective power, else the user's value, else the
cohort's default (``ingest.default_mpp``).

Scale matters: tiling normalises every slide to one target mpp, so a wrong mpp puts the wrong physical area
in every tile. A value outside the plausible range (for example the 96-dpi default of some TIFF writers,
264.58 um/px) is treated as missing, never trusted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from histcode.errors import HistcodeError

# By convention a 10x objective on a scanner images at about 1.0 um/px, so mpp ~= 10 / objective power.
MICRONS_AT_1X = 10.0


class MppError(HistcodeError, ValueError):
    """No trustworthy microns-per-pixel value for a slide; the message is the reason."""


@dataclass(frozen=True)
class Mpp:
    x: float
    y: float
    source: str  # "slide" | "objective" | "user" | "params" (ingest.default_mpp)


def _as_float(properties: Mapping[str, str], key: str) -> float | None:
    value = properties.get(key)
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number > 0 else None


def objective_power(properties: Mapping[str, str]) -> float | None:
    return _as_float(properties, "openslide.objective-power")


def resolve_mpp(
    properties: Mapping[str, str],
    user_mpp: float | None,
    plausible: tuple[float, float],
    max_anisotropy: float,
    default_mpp: float | None = None,
) -> Mpp:
    """The slide's mpp by priority: slide metadata > objective power > the user's value (``--mpp``, a manifest's
    mpp) > the cohort's ``default_mpp``. The last two are fallbacks for files that carry no usable scale, never
    overrides of one they do carry. Raises MppError with the reason."""
    lo, hi = plausible
    notes = []
    mx, my = _as_float(properties, "openslide.mpp-x"), _as_float(properties, "openslide.mpp-y")
    if mx is not None:
        my = my if my is not None else mx
        if not (lo <= mx <= hi and lo <= my <= hi):
            notes.append(
                f"slide mpp {mx:.4g}x{my:.4g} um/px is implausible (outside {lo}-{hi}; "
                "a TIFF writer's default resolution?)"
            )
        elif abs(mx - my) / mx > max_anisotropy:
            raise MppError(f"non-square pixels: mpp-x {mx} vs mpp-y {my} um/px")
        else:
            return Mpp(mx, my, "slide")
    else:
        notes.append("no mpp in the slide metadata")

    power = objective_power(properties)
    if power is not None:
        derived = MICRONS_AT_1X / power
        if lo <= derived <= hi:
            return Mpp(derived, derived, "objective")
        notes.append(f"objective power {power:g} gives implausible {derived:.4g} um/px")
    else:
        notes.append("no objective power")
    if user_mpp is not None:
        if not lo <= user_mpp <= hi:
            raise MppError("; ".join(notes) + f"; the given mpp {user_mpp} um/px is outside the plausible range {lo}-{hi}")
        return Mpp(user_mpp, user_mpp, "user")
    if default_mpp is not None:
        if not lo <= default_mpp <= hi:
            raise MppError("; ".join(notes) + f"; ingest.default_mpp {default_mpp} um/px is outside the plausible "
                           f"range {lo}-{hi}")
        return Mpp(default_mpp, default_mpp, "params")
    raise MppError("; ".join(notes) + " -- give the scale with --mpp, an mpp column in the manifest or "
                   "ingest.default_mpp in params.yaml")
