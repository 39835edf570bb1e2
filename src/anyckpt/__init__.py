"""anyckpt."""
