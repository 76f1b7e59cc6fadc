"""initial

Revision ID: 1a0c3e5f7b2d
Revises: <base>
Create Date: 2026-11-29 12:00:00
"""

from ckptmigrate import op

# revision identifiers, used by ckptmigrate.
revision = "1a0c3e5f7b2d"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The first revision describes SimpleModelV1 as trained: fc1 (10->20), fc2 (20->5).
    pass


def downgrade() -> None:
    pass
