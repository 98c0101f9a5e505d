"""The machine: Python, torch and its devices, OpenSlide, the optional extras, Chromium, free disk space."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path

from histcode.config import HistcodeConfig
from histcode.doctor.finding import FAIL, OK, WARN, Finding

AREA = "environment"
SUPPORTED_PYTHON = (3, 11)
MIN_OPENSLIDE = (4, 0)
# the extras of pyproject.toml: (extra, module that proves it is installed, what needs it)
EXTRAS = (
    ("viewer", "starlette", "`histcode view`"),
    ("foundation", "timm", "foundation encoders (UNI, Virchow, CONCH, ...) and timm:<name> encoders"),
    ("exchange", "h5py", "`histcode import trident|clam` and `histcode export h5|anndata`"),
    ("dicom", "pydicom", "telling the series of a DICOM WSI folder apart at ingest, and writing DICOM test slides"),
    ("polars", "polars", "format='polars' in the Python API"),
    ("server", "boto3", "the shared services (S3 artifacts, PostgreSQL, Dask on SLURM)"),
)
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
DISK_WARN_BYTES = 10 * 1024**3
DISK_FAIL_BYTES = 1 * 1024**3
# what OpenSlide 4.0 reads (4.0.0 added DICOM WSI); other formats go through HistCode's own readers or are refused
OPENSLIDE_FORMATS = ("Aperio SVS", "DICOM WSI", "Hamamatsu NDPI/VMS/VMU", "Leica SCN", "MIRAX MRXS", "Philips TIFF",
                     "Sakura SVSLIDE", "Trestle TIFF", "Ventana BIF/TIFF", "Zeiss CZI (uncompressed/zstd)", "Huron TIFF",
                     "ARGOS AVS", "generic tiled TIFF")
# read by HistCode's own readers (histcode.wsi.dispatch)
OWN_FORMATS = ("OME-TIFF", "stripped TIFF/SVS", "JPEG", "PNG")


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def python_check() -> Finding:
    found = sys.version_info[:2]
    text = ".".join(map(str, sys.version_info[:3]))
    if found != SUPPORTED_PYTHON:
        return Finding(AREA, "python", WARN, f"Python {text}; HistCode is built and tested on "
                       f"{'.'.join(map(str, SUPPORTED_PYTHON))}", "use Python 3.11 (`make setup` makes .venv with it)")
    return Finding(AREA, "python", OK, f"Python {text} ({sys.executable})")


def torch_checks(cfg: HistcodeConfig) -> list[Finding]:
    """torch and its accelerators; a stage configured for ``cuda`` on a machine without one fails here rather
    than an hour into a run."""
    try:
        import torch
    except ImportError as exc:
        return [Finding(AREA, "torch", FAIL, f"torch cannot be imported: {exc}",
                        "pip install torch==2.14.1 torchvision==0.29.1 (or `make setup`)")]
    out = [Finding(AREA, "torch", OK, f"torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'})")]
    wants_cuda = [name for name, device in (("tiling.device", cfg.tiling.device), ("pretrain.device", cfg.pretrain.device))
                  if device == "cuda"]
    if torch.cuda.is_available():
        devices = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append(f"cuda:{i} {props.name} ({props.total_memory / 1024**3:.0f} GiB)")
        out.append(Finding(AREA, "GPU", OK, "; ".join(devices)))
    elif wants_cuda:
        out.append(Finding(AREA, "GPU", FAIL, f"{', '.join(wants_cuda)} = cuda in params.yaml, but torch sees no CUDA "
                           "device" + ("" if torch.version.cuda else " (this torch is a CPU-only build)"),
                           "set them to auto (the CPU is used when there is no GPU), or install a CUDA build of torch "
                           "on a machine with a GPU"))
    else:
        out.append(Finding(AREA, "GPU", OK, "no CUDA device: tissue detection, pretraining and embedding run on the CPU"
                           " (device: auto)"))
    return out


def openslide_check() -> Finding:
    try:
        import openslide
    except (ImportError, OSError) as exc:
        return Finding(AREA, "OpenSlide", FAIL, f"openslide cannot be loaded: {exc}",
                       "pip install openslide-python==1.4.7 openslide-bin==4.0.1.2")
    version = getattr(openslide, "__library_version__", "unknown")
    if _version_tuple(version) < MIN_OPENSLIDE:
        return Finding(AREA, "OpenSlide", WARN, f"OpenSlide {version}: older than 4.0, so DICOM WSI is not read",
                       "pip install openslide-bin==4.0.1.2 (it takes precedence over a system library)")
    return Finding(AREA, "OpenSlide", OK, f"OpenSlide {version} (openslide-python {openslide.__version__}); reads "
                   + ", ".join(OPENSLIDE_FORMATS) + "; HistCode's own readers: " + ", ".join(OWN_FORMATS))


def extras_checks() -> list[Finding]:
    out = []
    for extra, module, feature in EXTRAS:
        if importlib.util.find_spec(module) is None:
            out.append(Finding(AREA, f"extra {extra}", WARN, f"{module} is not installed, so {feature} is unavailable",
                               f"pip install 'histcode[{extra}]'"))
        else:
            try:
                version = metadata.version(module)
            except metadata.PackageNotFoundError:
                version = "?"
            out.append(Finding(AREA, f"extra {extra}", OK, f"{module} {version}"))
    return out


def chromium_check() -> Finding:
    """The browser the viewer tests and screenshots drive (the distribution's; Playwright's download is not used)."""
    named = os.environ.get("CHROMIUM")
    for candidate in ((named,) if named else ()) + CHROMIUM_CANDIDATES:
        if candidate and Path(candidate).exists():
            return Finding(AREA, "Chromium", OK, f"{candidate} (for the viewer's browser tests)")
    found = shutil.which("chromium")
    if found:
        return Finding(AREA, "Chromium", OK, f"{found} (for the viewer's browser tests)")
    return Finding(AREA, "Chromium", WARN, "no Chromium found: the viewer's browser tests are skipped",
                   "scripts/install_chromium.sh (apt-get install chromium chromium-driver; `make setup` runs it)")


def disk_check(root: Path) -> Finding:
    where = root if root.exists() else root.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError as exc:
        return Finding(AREA, "disk", WARN, f"cannot measure free space at {where}: {exc}")
    text = f"{free / 1024**3:.1f} GiB free at {where}"
    if free < DISK_FAIL_BYTES:
        return Finding(AREA, "disk", FAIL, text + ": tiling and embedding will run out of space",
                       "free space, or put the workspace on a larger disk (HISTCODE_HOME)")
    if free < DISK_WARN_BYTES:
        return Finding(AREA, "disk", WARN, text + f" (under {DISK_WARN_BYTES // 1024**3} GiB)",
                       "a real cohort's tiles and vectors need tens of GiB")
    return Finding(AREA, "disk", OK, text)


def environment_checks(root: Path, cfg: HistcodeConfig) -> list[Finding]:
    return [python_check(), *torch_checks(cfg), openslide_check(), *extras_checks(), chromium_check(), disk_check(root)]
