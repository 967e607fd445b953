"""Training: config, components, the trainer loop, evaluation, logging and weights."""
