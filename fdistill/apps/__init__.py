"""The applications: the 2-D lab (``lab2d``), the image pipeline (``images``), the divergence
analysis (``analyze``) and the command line (``cli``)."""
