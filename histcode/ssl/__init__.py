"""Self-supervised contrastive pretraining: augmentations, losses, encoders, methods, training loop."""
