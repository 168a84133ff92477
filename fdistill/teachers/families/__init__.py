"""The teacher families, one module each; every module here is imported by ``teachers.open`` and registers its
``Teacher`` subclass (``teachers.base.register``)."""
