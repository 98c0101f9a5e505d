"""Which scale a slide is at, and when it is refused."""

from __future__ import annotations

import pytest

from histcode.wsi.mpp import MppError, resolve_mpp

PLAUSIBLE = (0.05, 20.0)


def resolve(props: dict, user: float | None = None):
    return resolve_mpp(props, user, PLAUSIBLE, 0.05)


def test_slide_mpp_wins() -> None:
    mpp = resolve({"openslide.mpp-x": "0.499", "openslide.mpp-y": "0.499", "openslide.objective-power": "20"})
    assert (mpp.x, mpp.source) == (0.499, "slide")


@pytest.mark.parametrize(("power", "expected"), [("20", 0.5), ("40", 0.25), ("10", 1.0)])
def test_objective_power_when_no_mpp(power: str, expected: float) -> None:
    mpp = resolve({"openslide.objective-power": power})
    assert (mpp.x, mpp.source) == (pytest.approx(expected), "objective")


def test_96_dpi_default_is_implausible_and_falls_back_to_objective() -> None:
    props = {"openslide.mpp-x": "264.5833", "openslide.mpp-y": "264.5833", "openslide.objective-power": "20"}
    assert resolve(props).source == "objective"


def test_96_dpi_without_objective_fails_with_reason() -> None:
    with pytest.raises(MppError, match=r"264.6.*implausible.*no objective power.*--mpp"):
        resolve({"openslide.mpp-x": "264.5833", "openslide.mpp-y": "264.5833"})


def test_nothing_at_all_fails() -> None:
    with pytest.raises(MppError, match="no mpp in the slide metadata; no objective power"):
        resolve({})


def test_user_mpp_is_a_fallback_never_an_override() -> None:
    assert resolve({"openslide.mpp-x": "264.58"}, user=0.25).source == "user"
    slide = resolve({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}, user=0.5)
    assert (slide.x, slide.source) == (0.25, "slide")  # a 40x slide stays 40x when --mpp covers other files
    assert resolve({"openslide.objective-power": "40"}, user=0.5).source == "objective"
    with pytest.raises(MppError, match="given mpp 300"):
        resolve({}, user=300.0)


def test_non_square_pixels_fail() -> None:
    with pytest.raises(MppError, match="non-square"):
        resolve({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.5"})


def test_garbage_values_are_treated_as_missing() -> None:
    assert resolve({"openslide.mpp-x": "n/a", "openslide.objective-power": "40"}).x == pytest.approx(0.25)
