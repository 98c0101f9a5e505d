"""A registered model's exported program stored without its weights, and the weights put back on load: the
tensors the run's module already holds (its ``state.pt``) are left out of the ``.pt2`` (meta records), so a
registered encoder keeps one copy of its weights (``histcode.tracking.Tracker.log_torch_model`` / ``load_model``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from histcode.tracking.model_files import pickle_refused

log = logging.getLogger(__name__)

WEIGHTS_METADATA = "histcode_weights"  # MLmodel metadata of a program logged without its weights: where they are


class ModelWeightsError(RuntimeError):
    """A program logged without its weights whose weights are missing or do not fit it."""


def strip_weights(program, keys: set[str]) -> int:
    """Replace the tensors named in ``keys`` in an ``ExportedProgram`` by meta tensors (shape and dtype, no
    data): ``torch.export.save`` then writes empty records for them, and ``torch.export.load`` gives meta
    tensors back. Returns the bytes left out."""
    import torch

    left_out = 0
    for key, value in list(program.state_dict.items()):
        if key in keys and not value.is_meta:
            left_out += value.numel() * value.element_size()
            empty = torch.empty_like(value, device="meta")
            is_param = isinstance(value, torch.nn.Parameter)
            program.state_dict[key] = torch.nn.Parameter(empty, value.requires_grad) if is_param else empty
    return left_out


def fill_weights(module, state: Mapping[str, Any], source: str) -> None:
    """Assign ``state``'s tensors to the meta parameters and buffers of a loaded program (``strip_weights``);
    every one must be there with its shape, and none may be left empty."""
    empty = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    missing = [k for k in empty if k not in state]
    if missing:
        raise ModelWeightsError(f"{source}: {len(missing)} tensors of the program are not in its weights "
                                f"({', '.join(missing[:5])})")
    try:
        module.load_state_dict({k: state[k] for k in empty}, strict=False, assign=True)
    except RuntimeError as exc:  # a tensor of another shape
        raise ModelWeightsError(f"{source}: the weights do not fit the program ({exc})") from exc
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise ModelWeightsError(f"{source}: {len(left)} tensors are still empty ({', '.join(left[:5])})")


def _tensors(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class ProgramWithoutWeights:
    """An MLflow flavor for ``mlflow.models.Model.log``: ``mlflow.pytorch``'s pt2 model (its MLmodel, signature,
    input example and environment, as ``mlflow.pytorch.log_model`` writes them), whose program is then saved
    again without the tensors in ``keys``. The program is loaded back once with them assigned from the module
    and must give the module's outputs on the input example; a plain ``mlflow.pytorch.load_model`` of it gets
    meta tensors, which fail at the first call rather than compute with made-up weights."""

    def __init__(self, keys: set[str]) -> None:
        self.keys = keys

    def save_model(self, path: str, mlflow_model, pytorch_model, input_example, **kwargs) -> None:
        import mlflow
        import torch
        from mlflow.utils.file_utils import get_total_file_size

        kwargs.pop("validate_serving_input", None)  # Model.log's own, done here instead
        mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model, input_example=input_example,
                                  **kwargs)
        (file,) = Path(path, mlflow_model.flavors["pytorch"]["model_data"]).glob("*.pt2")
        example = torch.from_numpy(input_example)
        program = torch.export.export(pytorch_model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
        left_out = strip_weights(program, self.keys)
        torch.export.save(program, file)
        del program
        with pickle_refused():  # as Tracker.load_model reads it: MLflow's pickle-free check of the archive first
            loaded = mlflow.pytorch.load_model(path)
        fill_weights(loaded, pytorch_model.state_dict(), str(file))
        with torch.inference_mode():
            want, got = _tensors(pytorch_model(example)), _tensors(loaded(example))
        if len(got) != len(want) or not all(torch.allclose(g, w, rtol=1e-4, atol=1e-5) for g, w in zip(got, want)):
            raise ModelWeightsError("the program saved without its weights gives other outputs than the module")
        log.info("program logged without %d MB of weights (the run's copy is loaded in their place)",
                 left_out // 2**20)
        mlflow_model.model_size_bytes = get_total_file_size(path)
        mlflow_model.save(str(Path(path, "MLmodel")))
