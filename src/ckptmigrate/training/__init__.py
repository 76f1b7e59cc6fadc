"""Training checkpoints: optimizer state that follows the parameters it belongs to.

PyTorch keys an optimizer's state by the parameter's *position* in the
optimizer, not by name, so a migration that renames, adds, drops or reshapes
parameters must rebuild that state or training resumes with scrambled
moments. :func:`migrate_training_state` (:mod:`.migrate`) does that for torch
training containers, in ``upgrade`` and ``downgrade``:

* :mod:`.policy`: ``optimizer_state = migrate | keep | drop``;
* :mod:`.sides` and :mod:`.layout`: which entries are parameters, before and
  after, in the optimizer's order;
* :mod:`.pairing`: which optimizer entry is which old parameter, checked, and
  which param group each new parameter joins;
* :mod:`.rebuild` and :mod:`.optimizer`: the new groups and every parameter's
  state carried along the plan of its weights;
* :mod:`.report`: what happened, in words.
"""

from .migrate import migrate_container as migrate_training_state

__all__ = ["migrate_training_state"]
