"""The frozen text-to-image diffusion model: loading and checking checkpoints, prompt and image encoding, UNet
calls, the guidance estimators behind the dream-loss gradient, and cross-attention maps."""
