"""diffusion_jax: latent text-to-image diffusion in JAX and Flax."""
