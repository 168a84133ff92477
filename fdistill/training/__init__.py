"""The training loop: Algorithm 1's steps (``distiller``), the loop that runs them (``loop``),
checkpoints and data parallelism."""
