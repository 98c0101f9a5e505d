"""Which slide formats HistCode reads, and the ones it refuses by name with what to convert them with.

Read: every format OpenSlide 4.0.1 reads (Aperio SVS, DICOM WSI, Hamamatsu NDPI/VMS/VMU, Leica SCN, MIRAX, Philips
TIFF, Sakura SVSLIDE, Trestle, Ventana BIF, Zeiss CZI uncompressed or zstd, Huron, ARGOS AVS, generic tiled
TIFF), plus OME-TIFF and images without a pyramid through ``histcode.wsi.image_reader``. A scanner format that
neither reads is refused with its name and a conversion path, never reported as "not a slide", and a directory
scan reports such files instead of skipping them (``REFUSED_EXTENSIONS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from histcode.wsi.reader import SlideReadError

BIOFORMATS = "bioformats2raw + raw2ometiff (Glencoe Software), or QuPath (File > Export images > OME TIFF)"


class UnsupportedFormatError(SlideReadError):
    """A known slide format that no reader here decodes; the message names it and how to convert it."""


@dataclass(frozen=True)
class RefusedFormat:
    name: str
    extensions: tuple[str, ...]
    convert: str  # how to turn it into something read here


REFUSED = (
    RefusedFormat("Olympus/Evident VSI", (".vsi",), f"convert it to OME-TIFF with {BIOFORMATS}"),
    RefusedFormat("Olympus/Evident ETS (the pixels of a VSI slide)", (".ets",),
                  f"convert its .vsi file to OME-TIFF with {BIOFORMATS}"),
    RefusedFormat("Leica LIF", (".lif",), f"convert it to OME-TIFF with {BIOFORMATS}, or Fiji (Bio-Formats export)"),
    RefusedFormat("KFBio KFB", (".kfb",), "convert it to SVS or TIFF with KFBio's converter (KFB2SVS / K-Viewer "
                  "export), then ingest that"),
    RefusedFormat("Philips iSyntax", (".isyntax", ".i2syntax"),
                  "convert it to OME-TIFF with isyntax2raw + raw2ometiff (Glencoe Software, needs the Philips "
                  "pixel engine), or export it as TIFF from Philips IntelliSite"),
    RefusedFormat("SQRay SDPC", (".sdpc",), "convert it to SVS or TIFF with the scanner vendor's converter "
                  "(SDPC to SVS), then ingest that"),
    RefusedFormat("Motic MDSX", (".mdsx", ".mds"), "export it as SVS or TIFF from Motic's software"),
    RefusedFormat("Aperio AFI (a fluorescence set)", (".afi",), "ingest the channel's .svs files it lists"),
    RefusedFormat("Hamamatsu NDPIS (a fluorescence set)", (".ndpis",), "ingest the channel's .ndpi files it lists"),
    RefusedFormat("Zeiss ZVI", (".zvi",), f"convert it to OME-TIFF with {BIOFORMATS}"),
    RefusedFormat("OME-Zarr (NGFF)", (".zarr",), "convert it to OME-TIFF with raw2ometiff (Glencoe Software)"),
)
REFUSED_EXTENSIONS = frozenset(e for f in REFUSED for e in f.extensions)
CZI_CONVERT = f"convert it to OME-TIFF with {BIOFORMATS}, or re-save it uncompressed or zstd-compressed in ZEN"


def refused_format(path: Path) -> RefusedFormat | None:
    suffix = path.suffix.lower()
    return next((f for f in REFUSED if suffix in f.extensions), None)


def refusal(path: Path, fmt: RefusedFormat) -> UnsupportedFormatError:
    return UnsupportedFormatError(f"{path.name}: {fmt.name} is not read by OpenSlide: {fmt.convert}")


def czi_refusal(path: Path, openslide_error: str) -> UnsupportedFormatError:
    """A Zeiss CZI OpenSlide detected but cannot decode (JPEG XR, JPEG or LZW subblocks, say)."""
    return UnsupportedFormatError(f"{path.name}: Zeiss CZI that OpenSlide 4 cannot decode ({openslide_error}); "
                                  "OpenSlide reads uncompressed and zstd-compressed CZI only: " + CZI_CONVERT)
