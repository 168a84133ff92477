"""Data: real images and their labels (``datasets``), minibatches for the trainer (``sampler``), image
writers (``writers``), conditions (``conditions``), text: CLIP tokenization (``text``), captioned images
and prompts (``captions``) and latent shards for text-to-image training (``latent_shards``)."""
