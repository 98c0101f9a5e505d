"""The shared services of a lab, run locally: PostgreSQL, an S3 endpoint, MLflow and Prefect servers and a Dask
cluster as separate processes on 127.0.0.1 (``stack``), for ``histcode services`` and the tests."""
