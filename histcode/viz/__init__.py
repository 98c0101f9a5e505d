"""Pictures: plots of head metrics and heatmaps over slides."""
