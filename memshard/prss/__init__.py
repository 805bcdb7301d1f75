"""PRSS (inference time), Ray-free: guidance algebra and re-anchoring, the sampler, candidate prompts, the
baselines it is compared with, privacy-level calibration, and the served text-to-image pipelines."""
