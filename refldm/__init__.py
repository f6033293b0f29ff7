"""refldm: a minimal, NumPy-first reference implementation of latent diffusion (Stable Diffusion)."""

__version__ = "0.1.0"
