"""Environment every service process and every HistCode process the stack starts gets: telemetry off (no
network here for it, and a lab's shared servers should not phone home)."""

TELEMETRY_OFF = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "GX_ANALYTICS_ENABLED": "false",
                 "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}
