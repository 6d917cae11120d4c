"""What train.py builds on: the optimizer and schedule (optim), checkpoints and the run's state,
starting / resuming / archiving a run (runs), several processes (distributed), the device and memory."""
