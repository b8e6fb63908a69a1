"""AST: the model (``model.py``) and its search space (``space.yaml``, package data:
ranges, what the Config accepts, the default synthesis family). See ``model.py``."""

from automl_ad.methods.ast.model import (
    AST,
    ASTConfig,
    SeededChannelPermutation,
    Student,
    build_teacher,
    positional_encoding,
)

__all__ = ["AST", "ASTConfig", "SeededChannelPermutation", "Student", "build_teacher", "positional_encoding"]
