"""Cluster launchers (SLURM via submitit)."""
