"""Storage (local or s3://) and the run directory: committed rounds, the manifest, weights as safetensors
only. Ray-free."""
