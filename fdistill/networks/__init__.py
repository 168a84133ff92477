"""Networks: EDM-compatible UNets (``edm``), small MLP denoisers (``mlp``), discriminator heads (``heads``)
and the feature taps that feed them (``taps``)."""
