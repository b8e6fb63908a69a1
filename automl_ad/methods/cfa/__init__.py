"""CFA: the model (``model.py``) and its search space (``space.yaml``, package data:
ranges, what the Config accepts, the default synthesis family). See ``model.py``."""

from automl_ad.methods.cfa.model import (
    CFA,
    CFAConfig,
    CoordConv1x1,
    kmeans,
)

__all__ = ["CFA", "CFAConfig", "CoordConv1x1", "kmeans"]
