"""Networks: EDM-compatible UNets (``edm``), small MLP denoisers (``mlp``), discriminator heads (``heads``)."""
