"""The project's exceptions, drawn as a tree where they are defined.

IPNError
 ├── ConfigurationError        bad settings, refused at start-up
 ├── UnknownAccount            no such account of that provider is configured
 ├── CallbackError             the stored callback cannot be acted on; the row is `rejected`
 │    ├── MalformedCallback    not the shape the provider sends (bad JSON, missing fields, ...)
 │    │    └── UnstorableValue an id, text or amount no column can keep as sent
 │    └── ForgedCallback       a signature, token, client id or key present and wrong
 ├── ProviderError             a server-to-server call did not give an answer we can use
 │    ├── ProviderUnavailable  transient (timeout, connection, 5xx, 429, garbage): retry later
 │    └── ProviderRejected     permanent (auth, bad request): retrying will not help
 │         └── PaymentNotFound the provider does not know the payment
 └── ConcurrentUpdate          a compare-and-set lost a race; run the transaction again
"""

from __future__ import annotations


class IPNError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigurationError(IPNError):
    pass


class UnknownAccount(IPNError, KeyError):
    def __init__(self, provider: str, account: str) -> None:
        super().__init__(provider, account)
        self.provider = provider
        self.account = account

    def __str__(self) -> str:
        return f"{self.provider} has no account named {self.account!r}"


class InvalidPaymentRequest(IPNError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class CallbackError(IPNError):
    pass


class MalformedCallback(CallbackError):
    pass


class UnstorableValue(MalformedCallback):
    """Too long, too large, too many decimals, a NUL byte or a lone surrogate: retrying or
    asking again gives the same value, so in a provider's answer it is a permanent refusal."""


class ForgedCallback(CallbackError):
    pass


class ProviderError(IPNError):
    pass


class ProviderUnavailable(ProviderError):
    pass


class ProviderRejected(ProviderError):
    pass


class PaymentNotFound(ProviderRejected):
    pass


class ConcurrentUpdate(IPNError):
    pass
