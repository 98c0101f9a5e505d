"""`histcode view`: a local, read-only web viewer over a workspace (cohort table, deep-zoom slides with overlays
at tile resolution, click-through similar-tile search). ``create_app`` builds the ASGI app."""

from histcode.viewer.app import create_app

__all__ = ["create_app"]
