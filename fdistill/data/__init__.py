"""Data: real images and their labels (``datasets``), minibatches for the trainer (``sampler``), image
writers (``writers``), conditions (``conditions``), captioned images and prompts (``captions``; tar shards
read by byte offset: ``tar_index``), the pixel transforms shared with evaluation (``transforms``) and latent
shards for text-to-image training (``latent_shards``)."""
