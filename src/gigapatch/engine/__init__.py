"""gigapatch.engine: the training loop, the step context, optimizers, checkpoints."""
