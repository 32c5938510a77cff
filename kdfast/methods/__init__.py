"""Distillation methods, one file each: ``kdfast/methods/<name>.py`` holds the method's pure loss functions,
its config schema, its validation and its :class:`~kdfast.methods.base.DistillationLoss`, and declares them
to :mod:`kdfast.methods.registry` as ``METHOD``. The config loader and the training loop find methods there,
so adding a method is adding its file (and its test and config).

This package module imports nothing.
"""
