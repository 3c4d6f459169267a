"""Launchers: `accelerate launch` lines, Slurm sbatch scripts and sweeps that all run `python -m train`."""
