"""SimpleModel with a schema version: old checkpoints upgrade themselves on load.

One decorator is all it takes. ``"../migrations"`` is resolved relative to
this file, so it finds the repository's (or the walkthrough's) migrations
folder. The class is pinned to the "add fc3" revision, the layout its
parameters have; without ``revision=`` it would follow the lineage's head.
"""

from __future__ import annotations

import ckptmigrate
from examples.simple_model import SimpleModel


@ckptmigrate.versioned("../migrations", revision="2b7f0c1d9e4a")
class VersionedSimpleModel(SimpleModel):
    pass
