"""PatchCore: the model (``model.py``) and its search space (``space.yaml``, package data:
ranges, what the Config accepts, the default synthesis family). See ``model.py``."""

from automl_ad.methods.patchcore.model import PatchCore, PatchCoreConfig, greedy_coreset

__all__ = ["PatchCore", "PatchCoreConfig", "greedy_coreset"]
