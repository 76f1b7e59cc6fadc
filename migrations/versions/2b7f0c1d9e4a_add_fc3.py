"""add fc3

Revision ID: 2b7f0c1d9e4a
Revises: 1a0c3e5f7b2d
Create Date: 2026-11-29 12:05:00
"""

from ckptmigrate import op

# revision identifiers, used by ckptmigrate.
revision = "2b7f0c1d9e4a"
down_revision = "1a0c3e5f7b2d"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The trained fc2 (20->5) becomes the new output layer fc3 ...
    op.rename_key("fc2.weight", "fc3.weight")
    op.rename_key("fc2.bias", "fc3.bias")
    # ... and the new fc2 (20->20) starts as the identity, so the upgraded
    # model computes exactly what the old one did.
    op.add_tensor("fc2.weight", shape=(20, 20), init="eye")
    op.add_tensor("fc2.bias", shape=(20,), init="zeros")


def downgrade() -> None:
    op.drop_key("fc2.weight")
    op.drop_key("fc2.bias")
    op.rename_key("fc3.weight", "fc2.weight")
    op.rename_key("fc3.bias", "fc2.bias")
