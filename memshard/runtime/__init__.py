"""The Ray shells over the training core: the driver, shard actors, the coordinator, progress and TensorBoard."""
