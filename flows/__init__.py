"""Prefect flows: orchestration around the histcode library (retries, concurrency, artifacts)."""
