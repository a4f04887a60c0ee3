"""The data: payments and their timeline, the inbox of notifications, and anomalies for review."""

from models.alert import Alert, AlertKind
from models.anomaly import Anomaly, AnomalyKind, AnomalyStatus
from models.base import Base, Money, UTCDateTime, new_id, utcnow
from models.event import (
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    Endpoint,
    EndpointOrigin,
    EndpointStatus,
    EventType,
    MerchantEvent,
)
from models.notification import (
    Notification,
    NotificationKind,
    NotificationReplay,
    NotificationStatus,
    ReplayMode,
)
from models.operator import Operator
from models.payment import OPEN, TERMINAL, EventSource, Payment, PaymentEvent, PaymentStatus
from models.rate_limit import ProviderCalls

__all__ = [
    "OPEN",
    "TERMINAL",
    "Alert",
    "AlertKind",
    "Anomaly",
    "AnomalyKind",
    "AnomalyStatus",
    "Base",
    "Delivery",
    "DeliveryAttempt",
    "DeliveryStatus",
    "Endpoint",
    "EndpointOrigin",
    "EndpointStatus",
    "EventSource",
    "EventType",
    "MerchantEvent",
    "Money",
    "Notification",
    "NotificationKind",
    "NotificationReplay",
    "NotificationStatus",
    "Operator",
    "Payment",
    "PaymentEvent",
    "PaymentStatus",
    "ProviderCalls",
    "ReplayMode",
    "UTCDateTime",
    "new_id",
    "utcnow",
]
