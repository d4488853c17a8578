"""NIfTI volumes -> sharded HDF5 slice store -> tensors (see `convert`, `store`, `demo`)."""
