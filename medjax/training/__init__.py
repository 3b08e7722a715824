"""Training: the run config, optimizer, train state and pure step, metrics, the loop, and
the ahead-of-time fit check."""
