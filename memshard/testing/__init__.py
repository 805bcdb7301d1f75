"""What only tests and jobs use: the tiny Stable-Diffusion-style pipeline builder and the fault injector."""
