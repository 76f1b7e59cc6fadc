"""Migration plans: symbolic tensor expressions per output key."""

from .nodes import Apply, Constant, Init, Node, Source, TensorSpec, seed_for
from .state import Evaluator, PlanState

__all__ = [
    "Apply",
    "Constant",
    "Evaluator",
    "Init",
    "Node",
    "PlanState",
    "Source",
    "TensorSpec",
    "seed_for",
]
