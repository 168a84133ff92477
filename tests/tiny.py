"""Tiny settings shared by the image tests: a digits EDM teacher of a few thousand parameters and a
distillation of a few iterations."""

TINY = ["teacher.network.model_channels=8", "teacher.network.channel_mult=[1, 2]", "teacher.network.num_blocks=1",
        "teacher.network.attn_resolutions=[]", "teacher.batch_size=16", "teacher.warmup=1", "disc_hidden=8"]
DISTILL = ["distill.batch_size=8", "distill.tau=2", "distill.log_every=1"]
