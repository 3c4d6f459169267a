"""The run: the trainers (SFT in ``trainer``, DPO/KTO in ``preference``), checkpoints and resume, the run
directory and what a run writes into it (outputs, samples, state bytes), launch checks and sweeps."""
