"""Teachers behind the denoiser interface D(x, sigma, cond): the analytic 2-D mixture, classifier-free
guidance, NVlabs/edm pickles, diffusers UNets, and loading any of them from a path."""
