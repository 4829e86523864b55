"""The moduleserve checkpoint registry: Module classes, versioned checkpoints, datasets."""
