"""Data: real images and their labels (``datasets``), minibatches for the trainer (``sampler``), and
image writers (``writers``)."""
