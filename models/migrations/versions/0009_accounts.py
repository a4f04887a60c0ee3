"""merchant accounts: the account of each payment, notification and call budget, and the secret
that verified each callback

Revision ID: 0009_accounts
Revises: 0008_alerts
Create Date: 2026-12-02 05:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0009_accounts'
down_revision: str | None = '0008_alerts'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _account() -> sa.Column:
    # Every row written before accounts existed belongs to the environment's account.
    return sa.Column('account', sa.String(length=40), server_default='default', nullable=False)


def upgrade() -> None:
    with op.batch_alter_table('payments') as batch_op:
        batch_op.add_column(_account())
        batch_op.drop_constraint('uq_payments_provider_order_id', type_='unique')
        batch_op.create_unique_constraint(
            op.f('uq_payments_provider_account_order_id'), ['provider', 'account', 'order_id']
        )
    with op.batch_alter_table('notifications') as batch_op:
        batch_op.add_column(_account())
        batch_op.add_column(sa.Column('verified_by', sa.String(length=64), nullable=True))
    with op.batch_alter_table('provider_calls') as batch_op:
        batch_op.add_column(_account())
        batch_op.drop_constraint('pk_provider_calls', type_='primary')
        batch_op.create_primary_key('pk_provider_calls', ['provider', 'account', 'period'])


def downgrade() -> None:
    with op.batch_alter_table('provider_calls') as batch_op:
        batch_op.drop_constraint('pk_provider_calls', type_='primary')
        batch_op.create_primary_key('pk_provider_calls', ['provider', 'period'])
        batch_op.drop_column('account')
    with op.batch_alter_table('notifications') as batch_op:
        batch_op.drop_column('verified_by')
        batch_op.drop_column('account')
    with op.batch_alter_table('payments') as batch_op:
        batch_op.drop_constraint('uq_payments_provider_account_order_id', type_='unique')
        batch_op.create_unique_constraint(
            op.f('uq_payments_provider_order_id'), ['provider', 'order_id']
        )
        batch_op.drop_column('account')
