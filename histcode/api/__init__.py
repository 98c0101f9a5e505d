"""HistCode's public Python API.

Everything listed in ``__all__`` here (and re-exported as ``histcode.<name>``) is public: it is documented,
typed, and keeps its name, arguments and behaviour within a major version; a change that breaks it is
announced a minor version ahead with a ``DeprecationWarning``. Every other module of the ``histcode`` package
is internal and may change in any release.

    import histcode

    ws = histcode.open()                      # the workspace the CLI would use (or histcode.open("path"))
    view = ws.view()                          # the default feature view ("@adco", "fv-...", "name@alias")
    tiles = view.tiles("subtype = 'LUSC'", columns=["tile_id", "slide_id", "vector"])   # pandas by default
    hits = view.nearest(tile_id=tiles.tile_id[0], k=5)
    ws.sql("SELECT subtype, count(*) AS tiles FROM tile_embeddings GROUP BY 1")
    bags = view.bags("tumor")                 # a torch Dataset of (bag, target, slide id) with the folds

Errors are exceptions whose messages are the command line's: every one is a ``HistcodeError``.
"""

from typing import TYPE_CHECKING

from histcode.api.frames import Format
from histcode.api.view import View
from histcode.api.workspace import Labels, Workspace, WorkspaceNotFound, load_encoder, open
from histcode.errors import HistcodeError, MissingExtra, ServiceUnavailable, UsageError
from histcode.features.registry import ViewError
from histcode.features.search import FilterError, SearchError
from histcode.heads.apply import HeadNotFound
from histcode.labels.run import LabelGateError
from histcode.store.catalog import CatalogError
from histcode.store.sql import QueryError, QueryLimitError, ReadOnlyQueryError, SqlLimits
from histcode.tracking.model_files import UnsafeModelError


if TYPE_CHECKING:  # for type checkers and the API reference; at run time imported on first use (torch)
    from histcode.api.bags import BagDataset


def __getattr__(name: str):
    if name == "BagDataset":  # imports torch: only when asked for
        from histcode.api.bags import BagDataset

        return BagDataset
    raise AttributeError(f"module 'histcode.api' has no attribute {name!r}")


__all__ = [
    "open",
    "Workspace",
    "View",
    "BagDataset",
    "Labels",
    "Format",
    "load_encoder",
    "HistcodeError",
    "WorkspaceNotFound",
    "ViewError",
    "SearchError",
    "FilterError",
    "QueryError",
    "QueryLimitError",
    "ReadOnlyQueryError",
    "SqlLimits",
    "UnsafeModelError",
    "LabelGateError",
    "HeadNotFound",
    "CatalogError",
    "UsageError",
    "ServiceUnavailable",
    "MissingExtra",
]
