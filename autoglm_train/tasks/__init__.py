"""Lightning modules: the training loops of each recipe."""
