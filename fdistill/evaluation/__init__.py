"""Evaluation: metrics (FID, precision/recall, mode coverage), the feature spaces they are computed
in (Inception-v3, the digits classifier, CLIP with its tokenizer ``clip_tokenizer``, DINO) and
``fdistill evaluate``."""
