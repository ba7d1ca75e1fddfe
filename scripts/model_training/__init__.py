"""Training of the project's bundled text-to-image models (tooling, not library: diffusers keeps its training in
``examples/`` the same way). ``scripts/train_bundled_model.py`` is the command line; docs/MODEL.md the record.

- :mod:`model_training.config`     every hyperparameter, presets (``objects``, ``shapes``), ``key=value`` overrides
- :mod:`model_training.scenes`     the training scenes (rendered once, cached) and wrong captions
- :mod:`model_training.tokenizer`  a CLIP BPE vocabulary in which each scene word is one token
- :mod:`model_training.models`     the components, built by :mod:`peekaboo.diffusion.components`
- :mod:`model_training.steps`      lr schedule, per-step batches, atomic checkpoints, EMA
- :mod:`model_training.vae_stage`  stage 1 (VAE) and the cached latents
- :mod:`model_training.unet_stage` stage 2 (text encoder + UNet, caption contrast)
- :mod:`model_training.pipeline`   both stages end to end and the export
- :mod:`model_training.samples`    the shapes model's sample grid and conditioning checks
- :mod:`model_training.object_checks` the objects model's sample grid and checks
- :mod:`model_training.denoising`  a pipeline's denoising errors under captions, which both checks compare
"""
