"""The diffusion models: UNet builders and schedules, frozen text encoders, DDIM sampling of a served UNet. Ray-free."""
