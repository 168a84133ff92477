"""The math of f-distill: f-divergences and their weights h (``divergences``), the EDM diffusion
formulation (``diffusion``) and the objective of Algorithm 1 (``objective``)."""
