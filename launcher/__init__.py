"""launcher: train PyTorch models from YAML recipes, from one CPU to a SLURM cluster."""

__version__ = "0.1.0"
