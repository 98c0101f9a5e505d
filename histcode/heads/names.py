"""Registered model names of the heads, one per task (aliases name the aggregator, ``best`` the chosen one)."""

MODEL_NAMES = {"tumor": "histcode-tumor-head", "subtype": "histcode-subtype-head", "de": "histcode-de-head",
               "survival": "histcode-survival-head"}
