"""The OpenAPI 3.1 document of every `/api/` endpoint, written by hand and kept true to the code
by tests/test_openapi.py (every route documented, every answer fuzzed against it)."""

from __future__ import annotations

from typing import Any

from models import (
    AnomalyKind,
    AnomalyStatus,
    DeliveryStatus,
    EndpointOrigin,
    EndpointStatus,
    EventSource,
    EventType,
    NotificationKind,
    NotificationStatus,
    PaymentStatus,
    ReplayMode,
)

PROVIDERS = ["cubepay", "bitcoinpaygate", "coinbarpay", "cryptoprocessing"]
Schema = dict[str, Any]


def _values(enum: Any) -> list[str]:
    return [member.value for member in enum]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _null(schema: Schema) -> Schema:
    """The schema or JSON null (OpenAPI 3.1 has no `nullable`)."""
    return {"anyOf": [schema, {"type": "null"}]}


def _object(properties: dict[str, Schema], *, optional: tuple[str, ...] = ()) -> Schema:
    """An answer object: every property present unless named optional, and nothing else, so
    that a field added in the code and not here fails the contract test."""
    return {
        "type": "object",
        "properties": properties,
        "required": [name for name in properties if name not in optional],
        "additionalProperties": False,
    }


STRING: Schema = {"type": "string"}
INTEGER: Schema = {"type": "integer"}
BOOLEAN: Schema = {"type": "boolean"}
TIME: Schema = {"type": "string", "format": "date-time"}
# Exact decimals as text: an amount never passes through a float.
MONEY: Schema = {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?$"}
# One of a provider's merchant accounts (IPN_ACCOUNTS_FILE); `default` is the environment's.
ACCOUNT: Schema = {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,39}$"}


def _extended(base: Schema, properties: dict[str, Schema]) -> Schema:
    """The base answer object with more properties, all present (a copy: allOf cannot extend
    an object that allows no other properties)."""
    return _object({**base["properties"], **properties}, optional=_optional(base))


def _optional(schema: Schema) -> tuple[str, ...]:
    return tuple(name for name in schema["properties"] if name not in schema["required"])


def _page(item: str, cursor: Schema) -> Schema:
    return _object(
        {
            "items": {"type": "array", "items": _ref(item)},
            "next": {
                **_null(cursor),
                "description": "Give it as `cursor` for the next page; null on the last page.",
            },
        }
    )


SCHEMAS: dict[str, Schema] = {
    "Error": _object(
        {
            "error": {**STRING, "description": "What was wrong, in words."},
            "field": {**_null(STRING), "description": "The request field that was wrong."},
        },
        optional=("field",),
    ),
    "DuplicateOrder": _object(
        {
            "error": STRING,
            "payment": {**_ref("Payment"), "description": "The payment already recorded."},
        }
    ),
    "Payment": _object(
        {
            "id": {"type": "string", "pattern": "^pay_[0-9a-hjkmnp-tv-z]{26}$"},
            "provider": {"enum": PROVIDERS},
            "account": ACCOUNT,
            "order_id": {
                **STRING,
                "description": "The merchant's reference, sent to the provider.",
            },
            "provider_payment_id": _null(STRING),
            "status": {"enum": _values(PaymentStatus)},
            "provider_status": _null(STRING),
            "amount": MONEY,
            "currency": STRING,
            "pay_amount": _null(MONEY),
            "pay_currency": _null(STRING),
            "paid_amount": _null(MONEY),
            "pay_address": _null(STRING),
            "pay_url": _null(STRING),
            "payment_uri": _null(STRING),
            "expires_at": _null(TIME),
            "next_check_at": _null(TIME),
            "adopted": {
                **BOOLEAN,
                "description": "Created at the provider by an earlier attempt and found there.",
            },
            "created_at": TIME,
            "updated_at": TIME,
        }
    ),
    "TimelineEvent": _object(
        {
            "at": TIME,
            "source": {"enum": _values(EventSource)},
            "from_status": _null({"enum": _values(PaymentStatus)}),
            "to_status": {
                "enum": _values(PaymentStatus),
                "description": "Equal to from_status when the event changed nothing.",
            },
            "provider_status": _null(STRING),
            "detail": STRING,
            "notification_id": _null(INTEGER),
        }
    ),
    "Delivery": _object(
        {
            "endpoint_id": STRING,
            "status": {"enum": _values(DeliveryStatus)},
            "attempts": INTEGER,
            "next_attempt_at": _null(TIME),
            "delivered_at": _null(TIME),
            "last_error": _null(STRING),
        }
    ),
    "PaymentMerchantEvent": _object(
        {
            "id": STRING,
            "type": {"enum": _values(EventType)},
            "sequence": _null(INTEGER),
            "status": {"enum": _values(DeliveryStatus)},
            "created_at": TIME,
            "deliveries": {"type": "array", "items": _ref("Delivery")},
        }
    ),
    "Anomaly": _object(
        {
            "id": INTEGER,
            "payment_id": _null(STRING),
            "kind": {"enum": _values(AnomalyKind)},
            "status": {"enum": _values(AnomalyStatus)},
            "evidence": {"type": "object"},
            "notification_id": _null(INTEGER),
            "created_at": TIME,
            "resolved_at": _null(TIME),
            "resolution": _null(STRING),
            "resolved_by": _null(STRING),
        }
    ),
    "Notification": _object(
        {
            "id": INTEGER,
            "provider": STRING,
            "account": ACCOUNT,
            "kind": {"enum": _values(NotificationKind)},
            "status": {"enum": _values(NotificationStatus)},
            "received_at": TIME,
            "processed_at": _null(TIME),
            "attempts": INTEGER,
            "last_error": _null(STRING),
            "outcome": _null(STRING),
            "payment_id": _null(STRING),
            "verified_by": _null(
                {
                    **STRING,
                    "description": "The secret that verified it: `current`, or a replaced one "
                    "(`previous until <time>`); null when no signature was verified.",
                }
            ),
        }
    ),
    "NotificationReplay": _object(
        {
            "at": TIME,
            "mode": {"enum": _values(ReplayMode)},
            "previous_status": {"enum": _values(NotificationStatus)},
            "previous_outcome": _null(STRING),
            "requested_by": STRING,
        }
    ),
    "Replayed": _object(
        {
            "count": INTEGER,
            "ids": {"type": "array", "items": INTEGER},
            "mode": {"enum": _values(ReplayMode)},
            "dry_run": BOOLEAN,
        },
        optional=("dry_run",),
    ),
    "Endpoint": _object(
        {
            "id": STRING,
            "url": STRING,
            "events": {
                "type": "array",
                "items": {"enum": _values(EventType)},
                "description": "Empty: all event types.",
            },
            "description": _null(STRING),
            "status": {"enum": _values(EndpointStatus)},
            "origin": {"enum": _values(EndpointOrigin)},
            "payment_id": _null(STRING),
            "failing_since": _null(TIME),
            "disabled_reason": _null(STRING),
            "created_at": TIME,
            "updated_at": TIME,
            "secret": {**STRING, "description": "Only in the answer that creates the endpoint."},
        },
        optional=("secret",),
    ),
    "NewSecret": _object(
        {
            "id": STRING,
            "secret": {**STRING, "description": "Shown once."},
            "previous_secret_valid_until": _null(TIME),
        }
    ),
    "MerchantEvent": _object(
        {
            "id": {"type": "string", "pattern": "^evt_[0-9a-hjkmnp-tv-z]{26}$"},
            "type": {"enum": _values(EventType)},
            "payment_id": _null(STRING),
            "anomaly_id": _null(INTEGER),
            "sequence": _null(INTEGER),
            "status": {"enum": _values(DeliveryStatus)},
            "created_at": TIME,
        }
    ),
    "DeliveryAttempt": _object(
        {
            "at": TIME,
            "endpoint_id": STRING,
            "status_code": _null(INTEGER),
            "duration_ms": INTEGER,
            "error": _null(STRING),
            "response": _null(STRING),
        }
    ),
    "Redelivered": _object(
        {
            "count": INTEGER,
            "ids": {"type": "array", "items": STRING},
            "dry_run": BOOLEAN,
        },
        optional=("dry_run",),
    ),
    "PaymentPage": _page("Payment", STRING),
    "NotificationPage": _page("Notification", INTEGER),
    "AnomalyPage": _page("Anomaly", INTEGER),
    "EndpointPage": _page("Endpoint", STRING),
    "MerchantEventPage": _page("MerchantEvent", STRING),
}

SCHEMAS["PaymentDetail"] = _extended(
    SCHEMAS["Payment"],
    {
        "timeline": {"type": "array", "items": _ref("TimelineEvent")},
        "anomalies": {"type": "array", "items": _ref("Anomaly")},
        "events": {
            "type": "array",
            "items": _ref("PaymentMerchantEvent"),
            "description": "What the merchant was told of this payment, in sequence.",
        },
    },
)
SCHEMAS["ReconciledPayment"] = _extended(
    SCHEMAS["Payment"],
    {"check": _object({"outcome": STRING, "message": STRING})},
)
SCHEMAS["NotificationDetail"] = _extended(
    SCHEMAS["Notification"],
    {
        "remote_addr": _null(STRING),
        "headers": {
            "type": "object",
            "additionalProperties": STRING,
            "description": "As received; values of secret-looking headers are `***`.",
        },
        "body": STRING,
        "body_encoding": {"enum": ["utf-8", "hex"]},
        "body_sha256": STRING,
        "traceback": _null(STRING),
        "replays": {"type": "array", "items": _ref("NotificationReplay")},
    },
)
SCHEMAS["MerchantEventDetail"] = _extended(
    SCHEMAS["MerchantEvent"],
    {
        "body": {
            "type": "object",
            "description": "The body as sent: `{type, timestamp, data}`.",
        },
        "deliveries": {"type": "array", "items": _ref("Delivery")},
        "attempts": {"type": "array", "items": _ref("DeliveryAttempt")},
    },
)

ERRORS = {
    "400": "Bad input: a parameter or the body is malformed; `error` names it.",
    "401": "No bearer token, a wrong one, or the API is closed (IPN_API_TOKEN unset).",
    "404": "No such row.",
    "409": "The request conflicts with the row's state.",
    "413": "The body is over IPN_MAX_BODY_BYTES.",
    "422": "A field's value is refused; `field` names it.",
    "502": "The provider did not answer well; nothing was recorded.",
}


def _answer(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _operation(
    summary: str,
    tag: str,
    answers: dict[str, Schema],
    errors: tuple[str, ...],
    *,
    parameters: list[Schema] | None = None,
    body: Schema | None = None,
    body_required: bool = True,
    example: Schema | None = None,
) -> Schema:
    responses = dict(answers)
    for code in ("401", *errors):
        responses[code] = _answer(_ref("Error"), ERRORS[code])
    operation: Schema = {"summary": summary, "tags": [tag], "responses": responses}
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        media: Schema = {"schema": body}
        if example is not None:
            media["example"] = example
        operation["requestBody"] = {
            "required": body_required,
            "content": {"application/json": media},
        }
        responses.setdefault("413", _answer(_ref("Error"), ERRORS["413"]))
    return operation


def _path(name: str, description: str) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


LIMIT = _query(
    "limit",
    {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
    "Items a page.",
)
SINCE = _query("since", STRING, "ISO 8601 (read as UTC without an offset) or an age: 30m, 6h, 2d.")
UNTIL = _query("until", STRING, "ISO 8601 or an age, as `since`.")
REFERENCE = _path(
    "reference", "The payment id, or the merchant's order id if it names one payment."
)
NOTIFICATION_ID = _path("notification_ref", "The notification's id, a whole number.")
ANOMALY_ID = _path("anomaly_ref", "The anomaly's id, a whole number.")
ENDPOINT_ID = _path("endpoint_id", "The endpoint's id.")
EVENT_ID = _path("event_id", "The event's id (`evt_...`).")
TIME_FILTER = {**STRING, "description": "ISO 8601 or an age (30m, 6h, 2d)."}

CREATE_PAYMENT: Schema = {
    "type": "object",
    "properties": {
        "provider": {"enum": PROVIDERS},
        "account": {**ACCOUNT, "default": "default"},
        "order_id": {
            **STRING,
            "description": "The merchant's reference; unique per provider account.",
        },
        "amount": {
            "anyOf": [MONEY, {"type": "number"}],
            "description": "A positive decimal, no more places than the currency has.",
        },
        "currency": STRING,
        "pay_currency": {**STRING, "description": "Where the provider needs it."},
        "description": STRING,
        "customer_email": STRING,
        "notify_url": {**STRING, "description": "Where this payment's own events also go."},
    },
    "required": ["provider", "order_id", "amount", "currency"],
}
NOTIFICATION_FILTER: Schema = {
    "type": "object",
    "properties": {
        "provider": {"enum": PROVIDERS},
        "account": ACCOUNT,
        "status": {"enum": _values(NotificationStatus)},
        "since": TIME_FILTER,
        "until": TIME_FILTER,
        "mode": {"enum": _values(ReplayMode), "default": "stored"},
        "dry_run": {**BOOLEAN, "default": False},
    },
    "description": "At least one of provider, account, status, since, until; they combine "
    "with AND.",
}
EVENT_FILTER: Schema = {
    "type": "object",
    "properties": {
        "payment_id": STRING,
        "type": {"enum": _values(EventType)},
        "status": {"enum": _values(DeliveryStatus)},
        "since": TIME_FILTER,
        "until": TIME_FILTER,
        "dry_run": {**BOOLEAN, "default": False},
    },
    "description": "At least one of payment_id, type, status, since, until.",
}
ENDPOINT_FIELDS: dict[str, Schema] = {
    "url": {**STRING, "description": "https, and not a private address unless allowed."},
    "events": {"type": "array", "items": {"enum": _values(EventType)}},
    "description": _null(STRING),
}

PATHS: dict[str, Schema] = {
    "/api/openapi.json": {
        "get": _operation(
            "This document",
            "operations",
            {"200": _answer({"type": "object"}, "The OpenAPI 3.1 document.")},
            (),
        )
    },
    "/api/payments": {
        "post": _operation(
            "Create a payment at a provider and record it",
            "payments",
            {
                "201": _answer(_ref("Payment"), "Created at the provider and recorded."),
                "200": _answer(
                    _ref("Payment"),
                    "An earlier attempt that looked failed had created it; now recorded.",
                ),
                "409": _answer(
                    _ref("DuplicateOrder"), "This provider and order_id are already recorded."
                ),
            },
            ("400", "422", "502"),
            body=CREATE_PAYMENT,
            example={
                "provider": "cubepay",
                "order_id": "M-1001",
                "amount": "10.00",
                "currency": "USD",
                "pay_currency": "BTC",
                "description": "Order 1001",
                "customer_email": "buyer@example.com",
            },
        ),
        "get": _operation(
            "List payments",
            "payments",
            {"200": _answer(_ref("PaymentPage"), "A page of payments, oldest id first.")},
            ("400",),
            parameters=[
                _query("order_id", STRING, "The merchant's reference."),
                _query("provider", {"enum": PROVIDERS}, "The provider."),
                _query("account", ACCOUNT, "One merchant account."),
                _query("status", {"enum": _values(PaymentStatus)}, "The normalized status."),
                _query("cursor", STRING, "The `next` of the previous page."),
                LIMIT,
            ],
        ),
    },
    "/api/payments/{reference}": {
        "get": _operation(
            "A payment with its timeline, anomalies and merchant events",
            "payments",
            {"200": _answer(_ref("PaymentDetail"), "The payment.")},
            ("400", "404", "409"),
            parameters=[REFERENCE],
        )
    },
    "/api/payments/{reference}/reconcile": {
        "post": _operation(
            "Ask the provider about the payment now",
            "payments",
            {"200": _answer(_ref("ReconciledPayment"), "The payment after the check.")},
            ("400", "404", "409"),
            parameters=[REFERENCE],
        )
    },
    "/api/notifications": {
        "get": _operation(
            "List stored callbacks",
            "notifications",
            {"200": _answer(_ref("NotificationPage"), "A page of notifications, oldest first.")},
            ("400",),
            parameters=[
                _query("provider", {"enum": PROVIDERS}, "The provider."),
                _query("account", ACCOUNT, "One merchant account."),
                _query("status", {"enum": _values(NotificationStatus)}, "The status."),
                SINCE,
                UNTIL,
                _query("cursor", {"type": "integer", "minimum": 0}, "The `next` of a page."),
                LIMIT,
            ],
        )
    },
    "/api/notifications/{notification_ref}": {
        "get": _operation(
            "A stored callback as received, with its replay history",
            "notifications",
            {"200": _answer(_ref("NotificationDetail"), "The notification.")},
            ("400", "404"),
            parameters=[NOTIFICATION_ID],
        )
    },
    "/api/notifications/{notification_ref}/replay": {
        "post": _operation(
            "Process a stored callback again",
            "notifications",
            {"202": _answer(_ref("Replayed"), "Queued.")},
            ("400", "404", "409"),
            parameters=[NOTIFICATION_ID],
            body={
                "type": "object",
                "properties": {"mode": {"enum": _values(ReplayMode), "default": "stored"}},
            },
            body_required=False,
        )
    },
    "/api/notifications/replay": {
        "post": _operation(
            "Replay every callback matching a filter",
            "notifications",
            {"200": _answer(_ref("Replayed"), "What matched; queued unless dry_run.")},
            ("400",),
            body=NOTIFICATION_FILTER,
        )
    },
    "/api/anomalies": {
        "get": _operation(
            "List anomalies",
            "anomalies",
            {"200": _answer(_ref("AnomalyPage"), "A page of anomalies, oldest first.")},
            ("400",),
            parameters=[
                _query("status", {"enum": _values(AnomalyStatus)}, "open or resolved."),
                _query("payment_id", STRING, "The payment."),
                _query("cursor", {"type": "integer", "minimum": 0}, "The `next` of a page."),
                LIMIT,
            ],
        )
    },
    "/api/anomalies/{anomaly_ref}/resolve": {
        "post": _operation(
            "Resolve an open anomaly, saying what was done",
            "anomalies",
            {"200": _answer(_ref("Anomaly"), "The resolved anomaly.")},
            ("400", "404", "409", "422"),
            parameters=[ANOMALY_ID],
            body={
                "type": "object",
                "properties": {"resolution": {"type": "string", "minLength": 1}},
                "required": ["resolution"],
            },
        )
    },
    "/api/endpoints": {
        "post": _operation(
            "Register a merchant endpoint",
            "endpoints",
            {"201": _answer(_ref("Endpoint"), "Registered; the answer holds its secret, once.")},
            ("400", "422"),
            body={"type": "object", "properties": ENDPOINT_FIELDS, "required": ["url"]},
            example={
                "url": "https://93.184.215.14/events",
                "events": ["payment.paid", "payment.expired"],
                "description": "the shop",
            },
        ),
        "get": _operation(
            "List merchant endpoints",
            "endpoints",
            {"200": _answer(_ref("EndpointPage"), "Every endpoint (one page).")},
            (),
        ),
    },
    "/api/endpoints/{endpoint_id}": {
        "get": _operation(
            "A merchant endpoint",
            "endpoints",
            {"200": _answer(_ref("Endpoint"), "The endpoint, without its secret.")},
            ("404",),
            parameters=[ENDPOINT_ID],
        ),
        "patch": _operation(
            "Change an endpoint's url, events, description or status",
            "endpoints",
            {"200": _answer(_ref("Endpoint"), "The endpoint after the change.")},
            ("400", "404", "409", "422"),
            parameters=[ENDPOINT_ID],
            body={
                "type": "object",
                "properties": {
                    **ENDPOINT_FIELDS,
                    "status": {"enum": _values(EndpointStatus)},
                },
                "additionalProperties": False,
            },
        ),
        "delete": _operation(
            "Delete an endpoint",
            "endpoints",
            {"204": {"description": "Deleted."}},
            ("404", "409"),
            parameters=[ENDPOINT_ID],
        ),
    },
    "/api/endpoints/{endpoint_id}/rotate-secret": {
        "post": _operation(
            "Give the endpoint a new signing secret",
            "endpoints",
            {"200": _answer(_ref("NewSecret"), "The new secret, once.")},
            ("404", "409"),
            parameters=[ENDPOINT_ID],
        )
    },
    "/api/events": {
        "get": _operation(
            "List merchant events",
            "events",
            {"200": _answer(_ref("MerchantEventPage"), "A page of events, oldest id first.")},
            ("400",),
            parameters=[
                _query("payment_id", STRING, "The payment."),
                _query("type", {"enum": _values(EventType)}, "The event type."),
                _query("status", {"enum": _values(DeliveryStatus)}, "The delivery status."),
                SINCE,
                UNTIL,
                _query("cursor", STRING, "The `next` of the previous page."),
                LIMIT,
            ],
        )
    },
    "/api/events/{event_id}": {
        "get": _operation(
            "A merchant event as sent, with every delivery attempt",
            "events",
            {"200": _answer(_ref("MerchantEventDetail"), "The event.")},
            ("404",),
            parameters=[EVENT_ID],
        )
    },
    "/api/events/{event_id}/redeliver": {
        "post": _operation(
            "Send an event again to its endpoints",
            "events",
            {"202": _answer(_ref("Redelivered"), "Queued.")},
            ("404",),
            parameters=[EVENT_ID],
        )
    },
    "/api/events/redeliver": {
        "post": _operation(
            "Send every event matching a filter again",
            "events",
            {"200": _answer(_ref("Redelivered"), "What matched; queued unless dry_run.")},
            ("400",),
            body=EVENT_FILTER,
        )
    },
}

DOCUMENT: Schema = {
    "openapi": "3.1.0",
    "info": {
        "title": "IPN receiver: operator and merchant API",
        "version": "1",
        "description": (
            "Payments, stored provider callbacks, anomalies, merchant endpoints and events. "
            "Amounts are strings holding exact decimals; times are ISO 8601 UTC."
        ),
    },
    "servers": [{"url": "/"}],
    "security": [{"bearer": []}],
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "IPN_API_TOKEN; with it unset every answer is 401.",
            }
        },
    },
}
