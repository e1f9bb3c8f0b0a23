"""Training: config and schedule, parameter groups, the data sampler, checkpoints and resume,
metrics, the loop, and the train-from-recipe workflow."""
