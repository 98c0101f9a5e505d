"""H&E stain in optical-density space: re-staining tiles (the demo's sites, the probe's perturbation) and
Macenko normalisation (a slide's own stain estimated and mapped onto a reference before an encoder sees it).

Beer-Lambert: optical density ``OD = -log((I + 1) / 256)`` per RGB channel, and ``I = 256 exp(-OD) - 1`` back.
In OD space a pixel is a sum of stain vectors (unit RGB absorption profiles) times concentrations. A tile is
decomposed with Ruifrok & Johnston's (2001) haematoxylin and eosin vectors (the third row of the stain matrix
is the unit normal of their plane: it carries what two stains do not explain, so nothing is thrown away), and
recomposed with a stain of its own: each concentration stretched by a factor, each stain vector turned by an
angle towards a direction in its tangent plane. The whole change is one 3x3 matrix in OD space.

Macenko et al. (2009), "A method for normalizing histology slides for quantitative analysis": the OD of the
absorbing pixels (OD norm above ``beta``; the paper asks it of every channel) spans a plane whose two main
axes come from the eigenvectors of their covariance; the stain vectors are the directions at the ``alpha`` and ``100 - alpha`` percentiles of
the pixels' angles in that plane (the one with the larger red absorption is haematoxylin); each stain's
concentration is scaled so that its 99th percentile matches the reference's, and the pixels are recomposed
with the reference vectors. The whole map is linear in OD (``StainEstimate.to_reference``), so a slide is
estimated once (from a sample of its tiles) and every tile is normalised with one 3x3 product.

``white_balance`` removes a tile batch's white point first (the OD of its brightest pixels, which should be
zero: empty glass passes white light), so that what is re-stained is the tissue, not the camera's cast.

``scanner_shift`` is the opposite test: one global change of a whole slide, as another scanner shows the same
glass (more haematoxylin, less eosin, a flatter, greyer image), for measuring what such a shift costs a head
trained on one scanner's slides (``benchmarks/stain_shift.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

RUIFROK = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]])  # H, E (rows), unit below
RUIFROK = RUIFROK / np.linalg.norm(RUIFROK, axis=1, keepdims=True)


_OD_LUT = -np.log((np.arange(256, dtype=np.float32) + 1.0) / 256.0)  # OD of each 8-bit intensity


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """float32 OD of 8-bit intensities (a table lookup)."""
    return _OD_LUT[np.asarray(rgb, dtype=np.uint8)]


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    return np.clip(256.0 * np.exp(-od) - 1.0 + 0.5, 0, 255).astype(np.uint8)


def stain_matrix(h: np.ndarray, e: np.ndarray) -> np.ndarray:
    """3x3: unit H, unit E and the unit normal of their plane, as rows."""
    h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
    n = np.cross(h, e)
    return np.stack([h, e, n / np.linalg.norm(n)])


REFERENCE = stain_matrix(RUIFROK[0], RUIFROK[1])
UNMIX = np.linalg.inv(REFERENCE)  # OD row vector @ UNMIX = (H, E, residual) concentrations


def _turn(v: np.ndarray, angle_deg: float, azimuth_deg: float) -> np.ndarray:
    """Unit ``v`` turned by ``angle_deg`` towards the tangent direction at ``azimuth_deg``."""
    a = np.cross(v, [0.0, 0.0, 1.0])
    a /= np.linalg.norm(a)
    b = np.cross(v, a)
    phi, theta = np.deg2rad(azimuth_deg), np.deg2rad(angle_deg)
    out = np.cos(theta) * v + np.sin(theta) * (np.cos(phi) * a + np.sin(phi) * b)
    out = np.maximum(out, 1e-3)  # a stain absorbs, it never emits
    return out / np.linalg.norm(out)


@dataclass(frozen=True)
class StainParams:
    """A stain as a change from the Ruifrok-Johnston reference: concentration stretches, vector turns."""

    h_scale: float = 1.0
    e_scale: float = 1.0
    h_angle: float = 0.0  # degrees the H vector is turned away from the reference
    h_azimuth: float = 0.0  # towards which side (degrees in its tangent plane)
    e_angle: float = 0.0
    e_azimuth: float = 0.0

    def vectors(self) -> np.ndarray:
        """3x3 stain matrix of this stain (rows H, E, normal)."""
        if self.h_angle == 0 and self.e_angle == 0:
            return REFERENCE
        return stain_matrix(_turn(REFERENCE[0], self.h_angle, self.h_azimuth),
                            _turn(REFERENCE[1], self.e_angle, self.e_azimuth))

    def transform(self) -> np.ndarray:
        """3x3 in OD space: reference-stained OD (row vectors) @ transform = OD in this stain."""
        gain = np.diag([self.h_scale, self.e_scale, 1.0])
        return (UNMIX @ gain @ self.vectors()).astype(np.float32)

    def then(self, jitter: StainParams) -> StainParams:
        """This stain with a smaller one on top: stretches multiply, turns add as 2-d offsets."""
        def add(a1: float, z1: float, a2: float, z2: float) -> tuple[float, float]:
            x = a1 * np.cos(np.deg2rad(z1)) + a2 * np.cos(np.deg2rad(z2))
            y = a1 * np.sin(np.deg2rad(z1)) + a2 * np.sin(np.deg2rad(z2))
            return float(np.hypot(x, y)), float(np.rad2deg(np.arctan2(y, x)) % 360)

        h_angle, h_az = add(self.h_angle, self.h_azimuth, jitter.h_angle, jitter.h_azimuth)
        e_angle, e_az = add(self.e_angle, self.e_azimuth, jitter.e_angle, jitter.e_azimuth)
        return StainParams(self.h_scale * jitter.h_scale, self.e_scale * jitter.e_scale, h_angle, h_az, e_angle, e_az)

    def record(self, prefix: str) -> dict[str, float]:
        return {prefix + k: round(float(v), 4) for k, v in asdict(self).items()}


def _random_stain(rng: np.random.Generator, log_scales: np.ndarray, max_angle: float) -> StainParams:
    """Stretches exp(log_scales) of H and E, each vector turned up to ``max_angle`` degrees to a random side."""
    return StainParams(
        h_scale=float(np.exp(log_scales[0])), e_scale=float(np.exp(log_scales[1])),
        h_angle=float(rng.uniform(0, max_angle)), h_azimuth=float(rng.uniform(0, 360)),
        e_angle=float(rng.uniform(0, max_angle)), e_azimuth=float(rng.uniform(0, 360)),
    )


def draw_stain(rng: np.random.Generator, max_angle: float, scale: tuple[float, float]) -> StainParams:
    """A random stain: turns of up to ``max_angle`` degrees, log-uniform stretches within ``scale``."""
    return _random_stain(rng, rng.uniform(np.log(scale[0]), np.log(scale[1]), size=2), max_angle)


def white_balance(od: np.ndarray, white_od: np.ndarray | None) -> np.ndarray:
    """OD with the batch's white point taken out (clipped at zero: nothing is brighter than glass)."""
    if white_od is None:
        return od
    return np.maximum(od - np.asarray(white_od, dtype=np.float32), 0.0)


def restain(rgb: np.ndarray, stain: StainParams, white_od: np.ndarray | None = None) -> np.ndarray:
    """``rgb`` (uint8, any shape ending in 3) white-balanced and re-stained to ``stain``.

    With ``white_od=None`` and the identity ``StainParams()`` the input comes back (within rounding)."""
    od = white_balance(rgb_to_od(rgb), white_od)
    return od_to_rgb(np.maximum(od @ stain.transform(), 0.0))


def jitter_stain(rng: np.random.Generator, log_sd: float, max_angle: float) -> StainParams:
    """A random re-staining for robustness checks: log-normal stretches (sd ``log_sd``) of each concentration,
    turns of up to ``max_angle`` degrees."""
    return _random_stain(rng, rng.normal(0, log_sd, size=2), max_angle)


# Macenko's reference (the values the method's public implementations normalise to): H and E vectors in
# RGB optical density, and the 99th-percentile concentrations of the reference slide.
MACENKO_VECTORS = ((0.5626, 0.7201, 0.4062), (0.2159, 0.8012, 0.5581))
MACENKO_MAX = (1.9705, 1.0308)
MAX_STAIN_COSINE = 0.995  # H and E closer than ~6 degrees: one stain, nothing to unmix (Ruifrok's are 40 apart)


class StainError(ValueError):
    """Too little stained tissue to estimate a stain from."""


@dataclass(frozen=True)
class StainEstimate:
    """A stain as Macenko estimates it: unit H and E vectors (rows, RGB OD) and their 99th-percentile
    concentrations."""

    vectors: tuple[tuple[float, float, float], tuple[float, float, float]]
    max_conc: tuple[float, float]

    def to_reference(self, vectors=MACENKO_VECTORS, max_conc=MACENKO_MAX) -> np.ndarray:
        """3x3 in OD space: OD (row vectors) in this stain @ matrix = OD in the reference stain
        (concentrations by least squares, scaled to the reference's maxima, recomposed)."""
        own = np.asarray(self.vectors, dtype=np.float64)
        ref = np.asarray(vectors, dtype=np.float64)
        ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
        gain = np.diag(np.asarray(max_conc, dtype=np.float64) / np.asarray(self.max_conc, dtype=np.float64))
        return (np.linalg.pinv(own) @ gain @ ref).astype(np.float32)


def estimate_stain(rgb: np.ndarray, beta: float = 0.15, alpha: float = 1.0, min_pixels: int = 500) -> StainEstimate:
    """Macenko's H and E vectors and concentration maxima of ``rgb`` (uint8, any shape ending in 3: a tile,
    or several tiles' pixels). A pixel counts as stained when the norm of its OD exceeds ``beta`` (the paper
    asks every channel to exceed it, which drops pure eosin: its red absorption is small, so the eosin vector
    came out as a mixture). Raises ``StainError`` with fewer than ``min_pixels`` stained pixels (glass)."""
    od = rgb_to_od(rgb).reshape(-1, 3).astype(np.float64)
    tissue = od[np.linalg.norm(od, axis=1) > beta]
    if len(tissue) < min_pixels:
        raise StainError(f"{len(tissue)} stained pixels (OD norm > {beta}); at least {min_pixels} needed")
    _, vecs = np.linalg.eigh(np.cov(tissue.T))
    plane = vecs[:, [2, 1]]  # the two largest eigenvalues' axes
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # axes pointing into positive OD
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
    h, e = (v_lo, v_hi) if v_lo[0] > v_hi[0] else (v_hi, v_lo)  # haematoxylin absorbs more red
    stains = np.stack([h, e])
    stains = stains * np.where(stains.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
    stains = stains / np.linalg.norm(stains, axis=1, keepdims=True)
    if float(stains[0] @ stains[1]) > MAX_STAIN_COSINE:
        raise StainError("the pixels show one stain only (the two stain directions are "
                         f"{np.degrees(np.arccos(min(1.0, float(stains[0] @ stains[1])))):.1f} degrees apart)")
    conc = tissue @ np.linalg.pinv(stains)
    max_conc = np.maximum(np.percentile(conc, 99, axis=0), 1e-3)
    return StainEstimate(tuple(tuple(float(x) for x in v) for v in stains), (float(max_conc[0]), float(max_conc[1])))



def apply_od_transform(rgb: np.ndarray, matrix: np.ndarray, white_od: np.ndarray | None = None) -> np.ndarray:
    """``rgb`` (uint8, ... x 3) white-balanced by ``white_od`` (``white_balance``; None: as read), its OD mapped
    by ``matrix`` (3x3, row vectors), negative OD clipped."""
    od = white_balance(rgb_to_od(rgb), white_od)
    return od_to_rgb(np.maximum(od @ np.asarray(matrix, dtype=np.float32), 0.0))


GLASS_MIN_INTENSITY = 180  # a glass pixel: every channel at least this bright ...
GLASS_MAX_CHROMA = 12  # ... and nearly grey (max - min channel); stained tissue is pink or purple
GLASS_MIN_PIXELS = 200  # fewer such pixels: no glass in the sample, the white point is left at 255
GLASS_TOP_FRACTION = 0.25  # the brightest quarter of the glass pixels is the lamp's white


def estimate_white(rgb: np.ndarray) -> np.ndarray | None:
    """The glass's white point of ``rgb`` (uint8, any shape ending in 3: a slide's sampled tiles) as OD per
    channel, or None where the sample shows no glass (the pixels' white is then taken as 255, OD 0).

    Empty glass should read white (OD 0); a scanner with a dimmer or tinted lamp, or lower contrast, shows it
    grey or cast, and every tissue pixel carries the same offset in OD. Glass is what is bright and grey at
    once: pixels whose every channel is at least ``GLASS_MIN_INTENSITY`` and whose channels differ by at most
    ``GLASS_MAX_CHROMA``; the white point is the per-channel median of their brightest ``GLASS_TOP_FRACTION``
    (by mean intensity). A white point brighter than the tissue's own brightest stain is what the OD offset
    subtracts: ``white_balance`` clips the result at zero."""
    flat = np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    glass = flat[(lo >= GLASS_MIN_INTENSITY) & (hi.astype(np.int16) - lo <= GLASS_MAX_CHROMA)]
    if len(glass) < GLASS_MIN_PIXELS:
        return None
    brightness = glass.mean(axis=1)
    top = glass[brightness >= np.quantile(brightness, 1.0 - GLASS_TOP_FRACTION)]
    white = np.median(top, axis=0).round().astype(np.uint8)
    return rgb_to_od(white)


SCANNER_H_GAIN = 0.3  # haematoxylin concentration x (1 + 0.3 s)
SCANNER_E_GAIN = -0.25  # eosin concentration x (1 - 0.25 s)
SCANNER_CONTRAST = -0.15  # RGB contrast about mid-grey x (1 - 0.15 s)
SCANNER_MAX_STRENGTH = 4.0  # beyond it eosin would turn negative
_SHIFT_ROWS = 512  # rows per chunk: a 40x demo slide's level 0 is shifted in bounded memory


def scanner_shift(rgb: np.ndarray, strength: float) -> np.ndarray:
    """``rgb`` (uint8, h x w x 3, or any shape ending in 3) as another scanner would show it: one global change
    of the whole image, of strength ``s`` in [0, 4] (0 returns the input unchanged, as a copy).

    1. Beer-Lambert optical density in this module's convention, ``OD = -ln((I + 1) / 256)`` per channel.
    2. Unmixed with the Ruifrok-Johnston reference (``REFERENCE``: unit H, unit E and the normal of their plane,
       rows), ``(c_H, c_E, c_r) = OD @ UNMIX``; haematoxylin scaled by ``1 + 0.3 s``, eosin by ``1 - 0.25 s``,
       the residual ``c_r`` kept; recomposed ``OD' = (c_H (1 + 0.3 s), c_E (1 - 0.25 s), c_r) @ REFERENCE``,
       negative OD clipped to 0 (nothing is brighter than glass); ``I = 256 exp(-OD') - 1``.
    3. Contrast lowered in RGB about mid-grey: ``I' = 128 + (1 - 0.15 s) (I - 128)``, clipped to [0, 255] and
       rounded to the nearest integer.

    White glass (``I = 255``, ``OD = 0``) is untouched by step 2 and becomes the same greyish white everywhere,
    ``128 + 127 (1 - 0.15 s)`` in every channel (236 at s = 1, 217 at s = 2), as a scanner with a dimmer,
    flatter lamp shows it.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim < 1 or rgb.shape[-1] != 3:
        raise ValueError(f"scanner_shift needs uint8 RGB (..., 3), got {rgb.dtype} of shape {rgb.shape}")
    s = float(strength)
    if not np.isfinite(s) or not 0.0 <= s <= SCANNER_MAX_STRENGTH:
        raise ValueError(f"scanner_shift strength must be in [0, {SCANNER_MAX_STRENGTH:g}], got {strength}")
    if s == 0.0:
        return rgb.copy()
    gain = np.diag([1.0 + SCANNER_H_GAIN * s, 1.0 + SCANNER_E_GAIN * s, 1.0])
    matrix = (UNMIX @ gain @ REFERENCE).astype(np.float32)  # OD row vectors @ matrix = the shifted OD
    contrast = np.float32(1.0 + SCANNER_CONTRAST * s)
    flat = rgb.reshape(-1, rgb.shape[-1]) if rgb.ndim < 3 else rgb
    out = np.empty_like(flat)
    for start in range(0, flat.shape[0], _SHIFT_ROWS):
        part = flat[start:start + _SHIFT_ROWS]
        intensity = np.clip(256.0 * np.exp(-np.maximum(rgb_to_od(part) @ matrix, 0.0)) - 1.0, 0.0, 255.0)
        shifted = 128.0 + contrast * (intensity - 128.0)
        out[start:start + _SHIFT_ROWS] = np.clip(np.floor(shifted + 0.5), 0, 255).astype(np.uint8)
    return out.reshape(rgb.shape)
