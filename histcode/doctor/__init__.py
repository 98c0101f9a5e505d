"""`histcode doctor`: a pre-flight check that says, before a long run, what is wrong and how to fix it.

Four areas, each a module of checks that return ``Finding`` rows and never raise for what they find:

- ``environment``: Python, torch, the CUDA devices, OpenSlide's version and formats, the optional extras, the
  Chromium the viewer tests drive, free disk space;
- ``stores``: the DuckDB catalog (opens read-only, its schema, damage), the vector tables (reachable, one per view
  the ledger calls materialised, row counts), the MLflow tracking store, and the shared services a lab's
  environment points at (``HISTCODE_MLFLOW_URI``, ``AWS_ENDPOINT_URL``, ``PREFECT_API_URL``,
  ``HISTCODE_DASK_ADDRESS``), plus the label gate's state;
- ``encoders``: every registered encoder version has the weights it refers to, each feature view's encoder
  version exists, the configured encoder resolves, and any weight file named on the command line
  (``--weights NAME=PATH``) is where it should be with the keys the architecture needs;
- ``slides``: a sample of the catalog's slides (or files named on the command line) opens, has a usable scale
  and shows tissue.

Nothing here writes to a store: the catalog is opened read-only (a catalog of an older schema is reported, not
upgraded), MLflow is asked through its client, the vector tables are listed and counted.
"""

from histcode.doctor.finding import FAIL, OK, WARN, Finding, failed
from histcode.doctor.run import AREAS, DoctorOptions, run_doctor

__all__ = ["AREAS", "FAIL", "OK", "WARN", "DoctorOptions", "Finding", "failed", "run_doctor"]
