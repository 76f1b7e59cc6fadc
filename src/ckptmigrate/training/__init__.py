"""Training checkpoints: optimizer state that follows the parameters it belongs to.

PyTorch keys an optimizer's state by the parameter's *position* in the
optimizer, not by name, so a migration that renames, adds, drops or reshapes
parameters must rebuild that state or training resumes with scrambled
moments. This package finds the optimizer states in a training container
(``{"optimizer": ...}``, Lightning's ``optimizer_states``), works out which
state-dict entries are parameters and in which order (:mod:`.layout`), and
carries every parameter's state along the same plan as its weights
(:mod:`.optimizer`).

The work starts in :func:`migrate_training_state`, which ``upgrade`` and
``downgrade`` call for torch training containers.
"""

from .migrate import migrate_container as migrate_training_state

__all__ = ["migrate_training_state"]
