"""Applications: what composes the layers below into user-facing work (training and registering the heads,
prediction on new slides, heatmaps, the ablation grid, the demo pipeline). Used by the CLI and by flows/."""
