"""IET-AGC+ training, Ray-free: AGC (agc), memory-sample redistribution (msr), threshold-aware augmentation (taa),
the dataset split, aggregation of proxies, and the proxy's training loop."""
