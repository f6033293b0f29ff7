"""Measuring what latent diffusion buys: cost (FLOPs and activation memory of a step), vae_report (what a VAE
keeps and loses), probe_images (synthetic test images).

May import: every library layer below (pipelines, models, core, ...). Nothing in the library imports it.
"""
