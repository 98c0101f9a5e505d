"""A downloaded model folder checked before MLflow reads it: only the torch.export (pt2) programs HistCode logs.

A workspace, or a model version in it, can come from someone else (the README invites copying workspaces), and
``mlflow.pytorch.load_model`` of a folder whose ``data/`` holds a ``model.pth`` unpickles it (MLflow 3 allows
pickle unless ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` is false), so loading a planted model would run any code it
carries. HistCode logs one layout only (``Tracker.log_torch_model``, ``ProgramWithoutWeights``): an MLmodel whose
``pytorch`` flavour has ``model_data: data`` and no ``code``, a ``data/`` folder holding ``model.pt2`` and
nothing else, and MLflow's own text files beside it. Anything else is refused here, before MLflow sees the folder,
and MLflow's own refusal is switched on for the load itself (``pickle_refused``), which also checks every record
inside the pt2 archive (its weights, constants and sample inputs are unpickled by ``torch.export.load``
otherwise). Nothing of a refused model is executed.
"""

from __future__ import annotations

import os
import re
import threading
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from histcode.errors import HistcodeError

ALLOW_PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
PROGRAM = "data/model.pt2"
# what MLflow writes beside the program of a pt2 model (the registry adds registered_model_meta); all are text
# files MLflow reads with yaml.safe_load or json, never code
MLFLOW_FILES = frozenset({"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "constraints.txt",
                          "input_example.json", "serving_input_example.json", "registered_model_meta"})
PICKLE_NAMES = frozenset({"model.pth", "pickle_module_info.txt"})
PICKLE_SUFFIXES = (".pth", ".pkl", ".pickle", ".joblib", ".pt", ".bin", ".ckpt", ".dill")
NATIVE_SUFFIXES = (".so", ".dll", ".dylib", ".pyd")  # an AOTInductor payload is dlopened by torch.export.load
RUN_ID = re.compile(r"^[0-9a-f]{32}$")

_env_lock = threading.RLock()


class UnsafeModelError(HistcodeError, ValueError):
    """A model that is not a program HistCode logged (a pickle, shipped code, another layout): refused before
    anything of it is loaded; the message names the model and the file."""


def _refuse(uri: str, reason: str) -> UnsafeModelError:
    return UnsafeModelError(f"model {uri} refused, nothing of it was loaded: {reason}. HistCode loads only the "
                            "torch.export (pt2) programs it logs; a model from elsewhere must be registered again "
                            "from its weights (`histcode pretrain` / `histcode heads` in this workspace)")


def _is_pickle(path: Path) -> bool:
    """By name, or by its first bytes: a pickle stream opens with PROTO (0x80) and its protocol number."""
    if path.name in PICKLE_NAMES or path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with path.open("rb") as fh:
        head = fh.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _check_flavours(folder: Path, uri: str) -> None:
    import yaml

    try:
        conf = yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise _refuse(uri, f"its MLmodel cannot be read ({type(exc).__name__}: {exc})") from exc
    flavours = conf.get("flavors") if isinstance(conf, dict) else None
    pytorch = flavours.get("pytorch") if isinstance(flavours, dict) else None
    if not isinstance(pytorch, dict):
        raise _refuse(uri, "its MLmodel has no pytorch flavour")
    if pytorch.get("model_data") != "data":
        raise _refuse(uri, f"its pytorch flavour reads {pytorch.get('model_data')!r}, not the data/ folder HistCode "
                           "writes")
    for name, flavour in flavours.items():
        if isinstance(flavour, dict) and flavour.get("code"):
            raise _refuse(uri, f"its {name} flavour ships code ({flavour['code']!r}), which MLflow would put on "
                               "sys.path and import")
    if "extra_files" in pytorch:
        raise _refuse(uri, "its pytorch flavour lists extra files, which HistCode never logs")


def _check_program(path: Path, uri: str) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise _refuse(uri, f"{PROGRAM} is not a pt2 archive ({type(exc).__name__}: {exc})") from exc
    native = [n for n in names if n.lower().endswith(NATIVE_SUFFIXES)]
    if native:
        raise _refuse(uri, f"{PROGRAM} holds native code ({native[0]}), which torch.export.load would load")


def check_model_folder(folder: Path, uri: str) -> None:
    """UnsafeModelError unless ``folder`` (a downloaded model) is laid out as HistCode logs a model: its MLmodel's
    pytorch flavour reads ``data/`` and ships no code, ``data/`` holds ``model.pt2`` alone, no file is a pickle or
    a link, and nothing else is there but MLflow's text files."""
    folder = Path(folder)
    if not (folder / "MLmodel").is_file():
        raise _refuse(uri, "it has no MLmodel file")
    _check_flavours(folder, uri)
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise _refuse(uri, f"{rel} is a symbolic link")
        if path.is_dir():
            if rel != "data":
                raise _refuse(uri, f"it holds a folder {rel}/, which HistCode never logs with a model")
            continue
        if rel == PROGRAM:
            continue
        if _is_pickle(path):
            raise _refuse(uri, f"it holds {rel}, a pickle (unpickling it would run any code it carries)")
        if rel not in MLFLOW_FILES:
            raise _refuse(uri, f"it holds {rel}, a file HistCode never logs with a model")
    if not (folder / PROGRAM).is_file():
        raise _refuse(uri, f"it has no {PROGRAM} program")
    _check_program(folder / PROGRAM, uri)


def check_weights_reference(reference: Any, uri: str) -> Mapping[str, str]:
    """The MLmodel metadata of a program logged without its weights: a run id and a relative artifact path
    inside that run (never ``..`` or an absolute path); UnsafeModelError otherwise."""
    if not isinstance(reference, Mapping) or not all(isinstance(reference.get(k), str) for k in ("run_id", "artifact")):
        raise _refuse(uri, f"its weights reference {reference!r} is not a run id and an artifact path")
    artifact = reference["artifact"]
    if (not RUN_ID.match(reference["run_id"]) or artifact.startswith(("/", "\\")) or "\\" in artifact
            or ".." in artifact.split("/") or "://" in artifact):
        raise _refuse(uri, f"its weights reference (run {reference['run_id']!r}, artifact {artifact!r}) points "
                           "outside a run's artifacts")
    return reference


@contextmanager
def pickle_refused() -> Iterator[None]:
    """MLflow's pickle refusal on for the block, whatever the environment says (a user's ``true`` included):
    ``mlflow.pytorch.load_model`` then also checks the records of a pt2 archive before ``torch.export.load``."""
    with _env_lock:
        previous = os.environ.get(ALLOW_PICKLE_ENV)
        os.environ[ALLOW_PICKLE_ENV] = "false"
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(ALLOW_PICKLE_ENV, None)
            else:
                os.environ[ALLOW_PICKLE_ENV] = previous


def refused_by_mlflow(exc: BaseException, uri: str) -> UnsafeModelError | None:
    """MLflow's own pickle refusal (a pt2 archive with a pickled record) as an UnsafeModelError, else None."""
    text = str(exc)
    if "pickle" not in text.lower() or "disallowed" not in text:
        return None
    record = re.search(r"record '([^']+)'", text)
    what = f"record {record.group(1)} of its {PROGRAM}" if record else "its program"
    return _refuse(uri, f"{what} is not a pickle-free payload (MLflow's check)")
