"""Device meshes, logical-axis sharding rules and multi-process setup.

The bottom layer: it knows nothing of the model. Whoever builds something sharded asks the
model for its logical axis names and this package for the shardings.
"""
