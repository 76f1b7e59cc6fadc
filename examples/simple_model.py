"""The walkthrough's model, before and after the change that needs a migration.

``SimpleModelV1`` is what the user trained: fc1 (10->20), ReLU, fc2 (20->5).
``SimpleModel`` is the class today: fc2 became 20->20 and a new fc3 (20->5)
follows it. Revision ``2b7f0c1d9e4a`` ("add fc3") moves the old fc2 to fc3
and starts the new fc2 as the identity, so an upgraded checkpoint computes
exactly what the old model did.
"""

from __future__ import annotations

import torch
from torch import nn


class SimpleModelV1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 20)
        self.fc2 = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class SimpleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 20)
        self.fc2 = nn.Linear(20, 20)
        self.fc3 = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def build_model() -> nn.Module:
    """What ``model =`` in alembic_style.ini points at: the current class."""
    return SimpleModel()


class SimpleModelV3(SimpleModel):
    """A later change (a LayerNorm before fc3), to show `check` and `revision --autogenerate`."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return self.fc3(self.norm(h))


def build_model_v3() -> nn.Module:
    return SimpleModelV3()
