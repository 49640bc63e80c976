"""The training wing: loop and step, start-up and resume, checkpoints, faults, tracking."""
