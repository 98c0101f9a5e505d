"""HistCode: contrastive computational histopathology as a feature store and ML-ops platform.

The public Python API is ``histcode.api``; its names are also here (``histcode.open``, ``histcode.Workspace``,
...), imported on first use so that ``import histcode`` stays fast.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("histcode")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.1.0"

PUBLIC = ("open", "Workspace", "View", "BagDataset", "Labels", "Format", "load_encoder", "HistcodeError",
          "WorkspaceNotFound", "ViewError", "SearchError", "FilterError", "QueryError", "QueryLimitError",
          "ReadOnlyQueryError", "SqlLimits", "UnsafeModelError", "LabelGateError", "HeadNotFound", "CatalogError", "UsageError", "ServiceUnavailable", "MissingExtra")


def __getattr__(name: str):
    if name in PUBLIC:
        import histcode.api

        return getattr(histcode.api, name)
    raise AttributeError(f"module 'histcode' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *PUBLIC])


__all__ = ["__version__", *PUBLIC]
