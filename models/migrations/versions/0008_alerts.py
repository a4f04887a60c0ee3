"""alerts, and the request id of each stored callback

Revision ID: 0008_alerts
Revises: 0007_retention
Create Date: 2026-12-02 03:05:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import models.base


revision: str = '0008_alerts'
down_revision: str | None = '0007_retention'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('alerts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('kind', sa.Enum('dead', 'anomaly', 'checks_failing', 'provider_silent', name='alertkind', native_enum=False, length=32), nullable=False),
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.Column('first_at', models.base.UTCDateTime(timezone=True), nullable=True),
    sa.Column('last_at', models.base.UTCDateTime(timezone=True), nullable=True),
    sa.Column('sent_at', models.base.UTCDateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.String(length=255), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alerts')),
    sa.UniqueConstraint('kind', 'key', name=op.f('uq_alerts_kind_key'))
    )
    with op.batch_alter_table('notifications') as batch_op:
        batch_op.add_column(sa.Column('request_id', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('notifications') as batch_op:
        batch_op.drop_column('request_id')
    op.drop_table('alerts')
