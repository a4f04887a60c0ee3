"""Settings read once from the environment and checked at start-up, not at the first callback."""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import re
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

from ipn.errors import ConfigurationError

# The ids seen in CubePay's docs and SDKs; others come from its /currency endpoints.
CUBEPAY_CURRENCY_IDS = {"ETH": 1, "BTC": 2, "USDT": 3, "LTC": 4, "TWD": 443, "USD": 447}

# CoinbarPay allows 1000 calls a day per client; polls take 800 and leave the rest to callbacks.
DEFAULT_POLL_LIMITS = {
    "cubepay": (120, "minute"),
    "bitcoinpaygate": (120, "minute"),
    "coinbarpay": (800, "day"),
}

PROVIDERS = ("cubepay", "bitcoinpaygate", "coinbarpay", "cryptoprocessing")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The account the environment's variables configure, behind today's callback paths.
DEFAULT_ACCOUNT = "default"
# An account's name is a path segment of its callback URL and a label of its metrics.
ACCOUNT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")


@dataclass(frozen=True)
class PreviousSecret:
    """A signing secret replaced at the provider, still accepted on callbacks received before
    `valid_until` so that those in flight or waiting in the inbox are not lost."""

    secret: str = field(repr=False)
    valid_until: datetime

    def valid_at(self, when: datetime) -> bool:
        return when < self.valid_until

    @property
    def label(self) -> str:
        """How a notification row names the secret that verified it, without revealing it."""
        return f"previous until {self.valid_until.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


@dataclass(frozen=True)
class CubePaySettings:
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    api_url: str = "https://api.cubepay.io"
    # CubePay names coins and fiat currencies by number; extend with CUBEPAY_CURRENCY_IDS.
    currency_ids: Mapping[str, int] = field(default_factory=lambda: dict(CUBEPAY_CURRENCY_IDS))
    allowed_ips: tuple[IPNetwork, ...] = ()
    account: str = DEFAULT_ACCOUNT
    previous_secrets: tuple[PreviousSecret, ...] = ()
    # This account's status-query budget; None: the provider's (IPN_POLL_LIMITS).
    poll_limit: tuple[int, str] | None = None
    # The credential that signs callbacks, the one `previous_secrets` replaced.
    signed_with: ClassVar[str] = "client_secret"

    @property
    def configured(self) -> bool:
        return bool(self.client_id and self.client_secret)

    def missing(self) -> list[str]:
        """The variables still to set before this provider is configured."""
        return _unset(CUBEPAY_CLIENT_ID=self.client_id, CUBEPAY_CLIENT_SECRET=self.client_secret)


@dataclass(frozen=True)
class BitcoinPaygateSettings:
    api_key_name: str | None = None
    api_key_secret: str | None = field(default=None, repr=False)
    hmac_key: str | None = field(default=None, repr=False)
    api_url: str = "https://api.bitcoinpaygate.com"
    allowed_ips: tuple[IPNetwork, ...] = ()
    account: str = DEFAULT_ACCOUNT
    previous_secrets: tuple[PreviousSecret, ...] = ()
    # This account's status-query budget; None: the provider's (IPN_POLL_LIMITS).
    poll_limit: tuple[int, str] | None = None
    # The credential that signs callbacks, the one `previous_secrets` replaced.
    signed_with: ClassVar[str] = "hmac_key"

    @property
    def configured(self) -> bool:
        return bool(self.api_key_name and self.api_key_secret)

    def missing(self) -> list[str]:
        """The variables still to set before this provider is configured."""
        return _unset(
            BITCOINPAYGATE_API_KEY_NAME=self.api_key_name,
            BITCOINPAYGATE_API_KEY_SECRET=self.api_key_secret,
        )


@dataclass(frozen=True)
class CoinbarPaySettings:
    service_client_id: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    api_url: str = "https://sandbox.coinbar.io"
    token_api_key: str | None = field(default=None, repr=False)
    token_secret: str | None = field(default=None, repr=False)
    # What a GET with no body signs: "{}" (default) or "" (COINBARPAY_SIGN_EMPTY_GET=empty).
    empty_body_signs: str = "{}"
    # How long a created payment stays payable when the answer does not say.
    payment_timeout: timedelta = timedelta(minutes=30)
    allowed_ips: tuple[IPNetwork, ...] = ()
    account: str = DEFAULT_ACCOUNT
    previous_secrets: tuple[PreviousSecret, ...] = ()
    # This account's status-query budget; None: the provider's (IPN_POLL_LIMITS).
    poll_limit: tuple[int, str] | None = None
    # The credential that signs callbacks, the one `previous_secrets` replaced.
    signed_with: ClassVar[str] = "secret_key"

    @property
    def configured(self) -> bool:
        return bool(self.service_client_id and self.secret_key)

    def missing(self) -> list[str]:
        """The variables still to set before this provider is configured."""
        return _unset(
            COINBARPAY_SERVICE_CLIENT_ID=self.service_client_id,
            COINBARPAY_SECRET_KEY=self.secret_key,
        )

    @property
    def legacy_tokens(self) -> bool:
        return bool(self.token_api_key and self.token_secret)


@dataclass(frozen=True)
class CryptoProcessingSettings:
    # Sent on every request beside its signature, so kept out of logs too.
    api_key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    api_url: str = "https://app.cryptoprocessing.com"
    # `life_time_duration` sent with each payment request.
    life_time: timedelta = timedelta(hours=1)
    allowed_ips: tuple[IPNetwork, ...] = ()
    account: str = DEFAULT_ACCOUNT
    previous_secrets: tuple[PreviousSecret, ...] = ()
    # This account's status-query budget; None: the provider's (IPN_POLL_LIMITS).
    poll_limit: tuple[int, str] | None = None
    # The credential that signs callbacks, the one `previous_secrets` replaced.
    signed_with: ClassVar[str] = "secret"

    @property
    def configured(self) -> bool:
        return bool(self.api_key and self.secret)

    def missing(self) -> list[str]:
        """The variables still to set before this provider is configured."""
        return _unset(CRYPTOPROCESSING_API_KEY=self.api_key, CRYPTOPROCESSING_SECRET=self.secret)


def _unset(**values: str | None) -> list[str]:
    return [name for name, value in values.items() if not value]


ProviderSettings = (
    CubePaySettings | BitcoinPaygateSettings | CoinbarPaySettings | CryptoProcessingSettings
)


@dataclass(frozen=True)
class HTTPSettings:
    """How the server-to-server clients talk to providers."""

    connect_timeout: float = 3.05
    read_timeout: float = 10.0
    attempts: int = 3
    backoff_max: float = 2.0
    # The whole call, every attempt and wait included: connect and read timeouts bound each
    # socket operation only, and a provider that trickles its answer would never trip them.
    total_timeout: float = 30.0


# How long after each failed attempt an event is tried again; past the last one it is `failed`.
DEFAULT_EVENT_RETRY_SCHEDULE = (5, 300, 1800, 7200, 18000, 36000, 36000)


@dataclass(frozen=True)
class EventSettings:
    """How events reach the merchant's endpoints."""

    # One endpoint without the API (IPN_MERCHANT_WEBHOOK_URL); the secret also signs the
    # events sent to a payment's own notify_url.
    webhook_url: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    # Loopback, private and plain-http endpoints, for local development and the sandbox.
    allow_private: bool = False
    connect_timeout: float = 3.05
    # The whole attempt, answer included: a shop that trickles its answer cannot hold a worker.
    total_timeout: float = 10.0
    retry_schedule: tuple[int, ...] = DEFAULT_EVENT_RETRY_SCHEDULE
    # After a rotation the previous secret still signs for this long.
    secret_overlap: timedelta = timedelta(hours=24)
    # An endpoint failing without a single delivery for this long is disabled.
    disable_after: timedelta = timedelta(days=5)

    @property
    def lease(self) -> timedelta:
        """How long an attempt holds its delivery: beyond any attempt's end."""
        return timedelta(seconds=2 * self.total_timeout + 5)


@dataclass(frozen=True)
class Settings:
    database_url: str
    redis_url: str | None = None
    api_token: str | None = field(default=None, repr=False)
    # Signs the operator console's session cookies (IPN_SECRET_KEY).
    secret_key: str | None = field(default=None, repr=False)
    # The operator console under /console (IPN_CONSOLE=0 turns it off).
    console: bool = True
    public_url: str = "http://localhost:8000"
    # Whether IPN_PUBLIC_URL was given: only then do alerts link to the console.
    public_url_set: bool = False
    max_body_bytes: int = 65536
    port: int = 8000
    data_dir: Path = Path(".")
    queue: str = "ipn"
    trusted_proxies: int = 0
    expiry_grace: timedelta = timedelta(minutes=10)
    coinbarpay_refund_window: timedelta = timedelta(days=30)
    # A notification task retries transient failures this many times before the row is `failed`.
    task_max_retries: int = 5
    task_retry_backoff_max: int = 300
    # Rows still `received` this long after their last attempt are enqueued again by the sweeper;
    # after `max_attempts` attempts they go `dead`.
    sweep_after: timedelta = timedelta(minutes=3)
    max_attempts: int = 8
    # Redis: an unacknowledged message comes back after this long; keep it above any retry delay.
    visibility_timeout: int = 3600
    # Status queries a reconciliation pass may make, per provider: (calls, "minute" | "day").
    poll_limits: Mapping[str, tuple[int, str]] = field(
        default_factory=lambda: dict(DEFAULT_POLL_LIMITS)
    )
    # How long a settled payment is still asked about: late funds after an expiry become
    # anomalies (IPN_LATE_PAYMENT_WATCH_HOURS).
    late_payment_watch: timedelta = timedelta(hours=24)
    reconcile_batch: int = 200
    # Status queries a batch has in flight at once (threads over each provider's keep-alive
    # session); 1 asks one payment after another.
    reconcile_concurrency: int = 8
    # Retention (`ipn prune`): the bytes of settled notifications and the customer data of
    # final payments are removed after this many days; rejected, failed and dead rows (the
    # evidence of something that went wrong) are kept for the longer of the two.
    retention_days: int = 90
    retention_failed_days: int = 365
    # `text` (the default, for a terminal) or `json`: one object a line for a log collector.
    log_format: str = "text"
    # A Slack-compatible incoming webhook for alerts; none sent without it.
    alert_webhook_url: str | None = field(default=None, repr=False)
    # A provider with open payments and no callback for this long is reported silent.
    provider_silence: timedelta = timedelta(hours=6)
    # More payments than this whose status query failed within ALERT_WINDOW raise an alert.
    alert_check_failures: int = 5
    # The same alert is not sent again within this period; what happens meanwhile is counted.
    alert_quiet: timedelta = timedelta(minutes=15)
    http: HTTPSettings = HTTPSettings()
    events: EventSettings = EventSettings()
    cubepay: CubePaySettings = CubePaySettings()
    bitcoinpaygate: BitcoinPaygateSettings = BitcoinPaygateSettings()
    coinbarpay: CoinbarPaySettings = CoinbarPaySettings()
    cryptoprocessing: CryptoProcessingSettings = CryptoProcessingSettings()
    # Each provider's further accounts (IPN_ACCOUNTS_FILE), by provider and name; the four
    # fields above are the `default` accounts.
    accounts: Mapping[str, Mapping[str, ProviderSettings]] = field(default_factory=dict)
    accounts_file: Path | None = None

    @property
    def embedded(self) -> bool:
        """True when no Redis is configured: the broker lives in a SQLite file beside the data."""
        return self.redis_url is None

    @property
    def local_default(self) -> bool:
        """The embedded default of `ipn run` (and its sandbox): SQLite and no Redis, one machine.
        Only here may the console's session key be generated and kept in the data directory."""
        return self.embedded and self.database_url.startswith("sqlite")

    @property
    def broker_url(self) -> str:
        if self.redis_url:
            return self.redis_url
        return f"sqla+sqlite:///{(self.data_dir / 'ipn-broker.sqlite').resolve()}"

    def provider(self, name: str) -> ProviderSettings:
        if name not in PROVIDERS:
            raise KeyError(name)
        value: ProviderSettings = getattr(self, name)
        return value

    def account(self, provider: str, name: str = DEFAULT_ACCOUNT) -> ProviderSettings:
        """One account's settings; KeyError for an account (or provider) not configured."""
        if name == DEFAULT_ACCOUNT:
            return self.provider(provider)
        return self.accounts.get(provider, {})[name]

    def has_account(self, provider: str, name: str) -> bool:
        """Whether the provider has an account of that name: a lookup, for every callback."""
        return name == DEFAULT_ACCOUNT or name in self.accounts.get(provider, {})

    def account_names(self, provider: str) -> tuple[str, ...]:
        return (DEFAULT_ACCOUNT, *sorted(self.accounts.get(provider, {})))

    def names_of_accounts(self, provider: str | None = None) -> list[str]:
        """The account names of one provider, or of any (a shop may have an account at each
        provider under one name): `default` first, then the others in order."""
        providers = [provider] if provider else PROVIDERS
        names = {name for p in providers for name in self.account_names(p)}
        return [DEFAULT_ACCOUNT, *sorted(names - {DEFAULT_ACCOUNT})]

    def all_accounts(self) -> Iterator[ProviderSettings]:
        for provider in PROVIDERS:
            for name in self.account_names(provider):
                yield self.account(provider, name)

    def with_changes(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from the environment; raise ConfigurationError naming the bad one."""
        env = os.environ if env is None else env
        reader = _EnvReader(env)
        data_dir = Path(reader.text("IPN_DATA_DIR") or ".")
        database_url = reader.text("DATABASE_URL") or (
            f"sqlite:///{(data_dir / 'ipn.sqlite').resolve()}"
        )
        # Heroku-style URLs name the old driver; SQLAlchemy wants psycopg 3 spelled out.
        for prefix in ("postgres://", "postgresql://"):
            if database_url.startswith(prefix):
                database_url = "postgresql+psycopg://" + database_url[len(prefix) :]
        defaults: dict[str, Any] = {name: _read_account(name, reader) for name in PROVIDERS}
        accounts_file = Path(raw) if (raw := reader.text("IPN_ACCOUNTS_FILE")) else None
        accounts = load_accounts(accounts_file, env) if accounts_file else {}
        for name, named in accounts.items():
            if DEFAULT_ACCOUNT in named:
                defaults[name] = named.pop(DEFAULT_ACCOUNT)
        settings = cls(
            database_url=database_url,
            redis_url=reader.text("REDIS_URL"),
            api_token=reader.text("IPN_API_TOKEN"),
            secret_key=reader.text("IPN_SECRET_KEY"),
            console=reader.flag("IPN_CONSOLE", default=True),
            public_url=(reader.text("IPN_PUBLIC_URL") or "http://localhost:8000").rstrip("/"),
            public_url_set=reader.text("IPN_PUBLIC_URL") is not None,
            max_body_bytes=reader.integer("IPN_MAX_BODY_BYTES", 65536, minimum=1024),
            port=reader.integer("PORT", 8000, minimum=1, maximum=65535),
            data_dir=data_dir,
            queue=reader.text("IPN_QUEUE") or "ipn",
            trusted_proxies=reader.integer("IPN_TRUSTED_PROXIES", 0, minimum=0, maximum=10),
            expiry_grace=timedelta(seconds=reader.integer("IPN_EXPIRY_GRACE_SECONDS", 600)),
            coinbarpay_refund_window=timedelta(
                days=reader.integer("COINBARPAY_REFUND_WINDOW_DAYS", 30)
            ),
            task_max_retries=reader.integer("IPN_TASK_MAX_RETRIES", 5),
            task_retry_backoff_max=reader.integer("IPN_TASK_RETRY_BACKOFF_MAX", 300, minimum=1),
            sweep_after=timedelta(seconds=reader.integer("IPN_SWEEP_AFTER_SECONDS", 180)),
            max_attempts=reader.integer("IPN_MAX_ATTEMPTS", 8, minimum=1),
            visibility_timeout=reader.integer("IPN_VISIBILITY_TIMEOUT", 3600, minimum=1),
            poll_limits=reader.poll_limits("IPN_POLL_LIMITS", DEFAULT_POLL_LIMITS),
            late_payment_watch=timedelta(hours=reader.integer("IPN_LATE_PAYMENT_WATCH_HOURS", 24)),
            reconcile_batch=reader.integer("IPN_RECONCILE_BATCH", 200, minimum=1, maximum=5000),
            reconcile_concurrency=reader.integer(
                "IPN_RECONCILE_CONCURRENCY", 8, minimum=1, maximum=64
            ),
            retention_days=reader.integer("IPN_RETENTION_DAYS", 90, minimum=1, maximum=36500),
            retention_failed_days=reader.integer(
                "IPN_RETENTION_FAILED_DAYS", 365, minimum=1, maximum=36500
            ),
            log_format=reader.choice("IPN_LOG_FORMAT", {"text": "text", "json": "json"}, "text"),
            alert_webhook_url=reader.text("IPN_ALERT_WEBHOOK_URL"),
            provider_silence=timedelta(
                hours=reader.integer("IPN_PROVIDER_SILENCE_HOURS", 6, minimum=1)
            ),
            alert_check_failures=reader.integer("IPN_ALERT_CHECK_FAILURES", 5, minimum=0),
            alert_quiet=timedelta(minutes=reader.integer("IPN_ALERT_QUIET_MINUTES", 15, minimum=1)),
            http=HTTPSettings(
                connect_timeout=reader.number("IPN_HTTP_CONNECT_TIMEOUT", 3.05),
                read_timeout=reader.number("IPN_HTTP_READ_TIMEOUT", 10.0),
                attempts=reader.integer("IPN_HTTP_ATTEMPTS", 3, minimum=1, maximum=10),
                backoff_max=reader.number("IPN_HTTP_BACKOFF_MAX", 2.0),
                total_timeout=reader.number("IPN_HTTP_TOTAL_TIMEOUT", 30.0),
            ),
            events=EventSettings(
                webhook_url=reader.text("IPN_MERCHANT_WEBHOOK_URL"),
                webhook_secret=reader.text("IPN_MERCHANT_WEBHOOK_SECRET"),
                allow_private=reader.flag("IPN_MERCHANT_ALLOW_PRIVATE"),
                connect_timeout=reader.number("IPN_EVENT_CONNECT_TIMEOUT", 3.05),
                total_timeout=reader.number("IPN_EVENT_TIMEOUT", 10.0),
                retry_schedule=reader.seconds_list(
                    "IPN_EVENT_RETRY_SCHEDULE", DEFAULT_EVENT_RETRY_SCHEDULE
                ),
                secret_overlap=timedelta(
                    hours=reader.integer("IPN_MERCHANT_SECRET_OVERLAP_HOURS", 24, minimum=0)
                ),
                disable_after=timedelta(
                    hours=reader.integer("IPN_MERCHANT_DISABLE_AFTER_HOURS", 120, minimum=1)
                ),
            ),
            **defaults,
            accounts=accounts,
            accounts_file=accounts_file,
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse combinations that would only fail later, at the first callback."""
        if not self.database_url.split(":", 1)[0].startswith(("sqlite", "postgresql")):
            raise ConfigurationError("DATABASE_URL must be a sqlite:// or postgresql:// URL")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://")):
            raise ConfigurationError("REDIS_URL must be a redis:// or rediss:// URL")
        if self.coinbarpay.legacy_tokens:
            key, iv = self.coinbarpay.token_api_key or "", self.coinbarpay.token_secret or ""
            if len(key.encode()) != 32 or len(iv.encode()) != 16:
                raise ConfigurationError(
                    "COINBARPAY_TOKEN_API_KEY must be 32 bytes and COINBARPAY_TOKEN_SECRET 16 bytes"
                )
        self._check_events()
        if self.alert_webhook_url and not self.alert_webhook_url.startswith(
            ("https://", "http://")
        ):
            raise ConfigurationError("IPN_ALERT_WEBHOOK_URL must be an http(s) URL")
        if self.console and not self.secret_key and not self.local_default:
            raise ConfigurationError(
                "IPN_SECRET_KEY must be set to sign the console's sessions"
                " (or IPN_CONSOLE=0 to turn the console off)"
            )
        if self.secret_key and len(self.secret_key) < 16:
            raise ConfigurationError("IPN_SECRET_KEY must be at least 16 characters")
        if self.retention_failed_days < self.retention_days:
            raise ConfigurationError(
                "IPN_RETENTION_FAILED_DAYS must be at least IPN_RETENTION_DAYS"
                f" ({self.retention_days}), not {self.retention_failed_days}"
            )
        if self.task_retry_backoff_max >= self.visibility_timeout:
            raise ConfigurationError(
                "IPN_TASK_RETRY_BACKOFF_MAX must be shorter than IPN_VISIBILITY_TIMEOUT"
            )

    def _check_events(self) -> None:
        events = self.events
        if events.webhook_url and not events.webhook_secret:
            raise ConfigurationError(
                "IPN_MERCHANT_WEBHOOK_URL needs IPN_MERCHANT_WEBHOOK_SECRET to sign its events"
            )
        if events.webhook_secret and not _webhook_secret(events.webhook_secret):
            raise ConfigurationError(
                "IPN_MERCHANT_WEBHOOK_SECRET must be whsec_ followed by base64 (24 to 64 bytes)"
            )
        if events.webhook_url and not events.webhook_url.startswith(("https://", "http://")):
            raise ConfigurationError("IPN_MERCHANT_WEBHOOK_URL must be an https:// URL")


def _webhook_secret(secret: str) -> bool:
    """A Standard Webhooks secret: `whsec_` and the base64 of the key bytes."""
    if not secret.startswith("whsec_"):
        return False
    try:
        key = base64.b64decode(secret[len("whsec_") :], validate=True)
    except ValueError:
        return False
    return 24 <= len(key) <= 64


def _read_account(
    provider: str, reader: _EnvReader, account: str = DEFAULT_ACCOUNT
) -> ProviderSettings:
    """One account's settings from `<PROVIDER>_*` variables (or an accounts-file table read
    as if it were those variables)."""
    prefix = provider.upper()
    common: dict[str, Any] = {
        "account": account,
        "allowed_ips": reader.networks(f"{prefix}_ALLOWED_IPS"),
        "previous_secrets": reader.previous_secret(f"{prefix}_PREVIOUS_SECRET"),
        # The environment's account keeps IPN_POLL_LIMITS; a file's account may have its own.
        "poll_limit": reader.poll_limit(f"{prefix}_POLL_LIMIT") if reader.where else None,
    }
    if provider == "cubepay":
        return CubePaySettings(
            client_id=reader.text("CUBEPAY_CLIENT_ID"),
            client_secret=reader.text("CUBEPAY_CLIENT_SECRET"),
            api_url=reader.url("CUBEPAY_API_URL", "https://api.cubepay.io"),
            currency_ids=reader.currency_ids("CUBEPAY_CURRENCY_IDS", CUBEPAY_CURRENCY_IDS),
            **common,
        )
    if provider == "bitcoinpaygate":
        return BitcoinPaygateSettings(
            api_key_name=reader.text("BITCOINPAYGATE_API_KEY_NAME"),
            api_key_secret=reader.text("BITCOINPAYGATE_API_KEY_SECRET"),
            hmac_key=reader.text("BITCOINPAYGATE_HMAC_KEY"),
            api_url=reader.url("BITCOINPAYGATE_API_URL", "https://api.bitcoinpaygate.com"),
            **common,
        )
    if provider == "coinbarpay":
        return CoinbarPaySettings(
            service_client_id=reader.text("COINBARPAY_SERVICE_CLIENT_ID"),
            secret_key=reader.text("COINBARPAY_SECRET_KEY"),
            api_url=reader.url("COINBARPAY_API_URL", "https://sandbox.coinbar.io"),
            token_api_key=reader.text("COINBARPAY_TOKEN_API_KEY"),
            token_secret=reader.text("COINBARPAY_TOKEN_SECRET"),
            empty_body_signs=reader.choice(
                "COINBARPAY_SIGN_EMPTY_GET", {"json": "{}", "empty": ""}, "json"
            ),
            payment_timeout=timedelta(
                minutes=reader.integer("COINBARPAY_PAYMENT_TIMEOUT_MINUTES", 30, minimum=1)
            ),
            **common,
        )
    return CryptoProcessingSettings(
        api_key=reader.text("CRYPTOPROCESSING_API_KEY"),
        secret=reader.text("CRYPTOPROCESSING_SECRET"),
        api_url=reader.url("CRYPTOPROCESSING_API_URL", "https://app.cryptoprocessing.com"),
        life_time=timedelta(
            seconds=reader.integer("CRYPTOPROCESSING_LIFE_TIME_SECONDS", 3600, minimum=60)
        ),
        **common,
    )


# What an account's table in IPN_ACCOUNTS_FILE may hold: its provider's variables without the
# prefix, in lower case, and the two keys only a file has.
_SETTINGS_CLASSES: dict[str, Any] = {
    "cubepay": CubePaySettings,
    "bitcoinpaygate": BitcoinPaygateSettings,
    "coinbarpay": CoinbarPaySettings,
    "cryptoprocessing": CryptoProcessingSettings,
}
ACCOUNT_KEYS = {
    "cubepay": ("client_id", "client_secret", "api_url", "currency_ids"),
    "bitcoinpaygate": ("api_key_name", "api_key_secret", "hmac_key", "api_url"),
    "coinbarpay": (
        "service_client_id",
        "secret_key",
        "api_url",
        "token_api_key",
        "token_secret",
        "sign_empty_get",
        "payment_timeout_minutes",
    ),
    "cryptoprocessing": ("api_key", "secret", "api_url", "life_time_seconds"),
}
_FILE_ONLY_KEYS = ("allowed_ips", "poll_limit", "previous_secrets")


def _required_keys(provider: str) -> list[str]:
    """The credentials without which an account does nothing: a file's account needs them."""
    return [name.split("_", 1)[1].lower() for name in _SETTINGS_CLASSES[provider]().missing()]


def _env_defines(provider: str, env: Mapping[str, str]) -> bool:
    """Whether the environment configures this provider's `default` account."""
    prefix = provider.upper()
    return any(
        env.get(f"{prefix}_{key.upper()}", "").strip()
        for key in (*_required_keys(provider), _SETTINGS_CLASSES[provider].signed_with)
    )


def load_accounts(path: Path, env: Mapping[str, str]) -> dict[str, dict[str, ProviderSettings]]:
    """Every account of IPN_ACCOUNTS_FILE, by provider and name; ConfigurationError names the
    first table or key that is wrong."""
    where = f"IPN_ACCOUNTS_FILE {path}"
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigurationError(f"{where}: cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{where}: not TOML: {exc}") from None
    accounts: dict[str, dict[str, ProviderSettings]] = {}
    for provider, tables in document.items():
        if provider not in PROVIDERS:
            raise ConfigurationError(
                f"{where}: [{provider}] is not a provider (known: {', '.join(PROVIDERS)})"
            )
        if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
            raise ConfigurationError(
                f"{where}: [{provider}] must hold one table per account, like [{provider}.shop]"
            )
        for name, table in tables.items():
            accounts.setdefault(provider, {})[name] = _file_account(where, provider, name, table)
        if DEFAULT_ACCOUNT in tables and _env_defines(provider, env):
            raise ConfigurationError(
                f"{where}: [{provider}.default] and the {provider.upper()}_* variables both "
                f"define the account at /ipn/{provider}; keep one"
            )
        named = dict(accounts.get(provider, {}))
        from_env = _env_defines(provider, env)
        if from_env:
            named = {DEFAULT_ACCOUNT: _read_account(provider, _EnvReader(env)), **named}
        _refuse_shared_credentials(where, provider, named, from_env)
    return accounts


def _file_account(where: str, provider: str, name: str, table: dict[str, Any]) -> ProviderSettings:
    here = f"{where}: [{provider}.{name}]"
    if not ACCOUNT_NAME.fullmatch(name):
        raise ConfigurationError(
            f"{here}: an account's name is lower-case letters, digits, - and _, at most 40"
        )
    allowed = (*ACCOUNT_KEYS[provider], *_FILE_ONLY_KEYS)
    for key in table:
        if key not in allowed:
            raise ConfigurationError(f"{here}: unknown key {key!r} (known: {', '.join(allowed)})")
    for key in _required_keys(provider):
        if key not in table:
            raise ConfigurationError(f"{here}: {key} is missing")
    prefix = provider.upper()
    variables = {
        f"{prefix}_{key.upper()}": _as_variable(here, key, value)
        for key, value in table.items()
        if key != "previous_secrets"
    }
    for key in _required_keys(provider):
        if not variables[f"{prefix}_{key.upper()}"].strip():
            raise ConfigurationError(f"{here}: {key} is empty")
    settings = _read_account(provider, _EnvReader(variables, here), name)
    previous = _previous_secrets(here, table.get("previous_secrets", []))
    if previous and not getattr(settings, settings.signed_with):
        raise ConfigurationError(
            f"{here}: previous_secrets replace {settings.signed_with}, which is not set"
        )
    return replace(settings, previous_secrets=previous)


def _as_variable(here: str, key: str, value: Any) -> str:
    """A TOML value as the text of the variable it stands for."""
    if key == "allowed_ips":
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return ",".join(value)
        raise ConfigurationError(
            f'{here}: allowed_ips must be a list of networks, like ["203.0.113.0/24"]'
        )
    if key == "currency_ids":
        numbers = value.values() if isinstance(value, dict) else [None]
        if all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
            return ",".join(f"{code}={number}" for code, number in value.items())
        raise ConfigurationError(
            f"{here}: currency_ids must be a table of currency ids, like {{EUR = 446}}"
        )
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ConfigurationError(f"{here}: {key} must be text")


def _previous_secrets(here: str, entries: Any) -> tuple[PreviousSecret, ...]:
    example = '[{secret = "...", valid_until = 2027-01-31T00:00:00Z}]'
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigurationError(f"{here}: previous_secrets must look like {example}")
    previous = []
    for number, entry in enumerate(entries, 1):
        what = f"{here}: previous_secrets entry {number}"
        unknown = sorted(set(entry) - {"secret", "valid_until"})
        if unknown:
            raise ConfigurationError(f"{what}: unknown key {unknown[0]!r}")
        secret, valid_until = entry.get("secret"), entry.get("valid_until")
        if not isinstance(secret, str) or not secret.strip():
            raise ConfigurationError(f"{what}: secret is missing or empty")
        if not isinstance(valid_until, datetime) or valid_until.tzinfo is None:
            raise ConfigurationError(
                f"{what}: valid_until must be a time with its offset, like 2027-01-31T00:00:00Z"
            )
        previous.append(PreviousSecret(secret, valid_until.astimezone(UTC)))
    return tuple(previous)


def _refuse_shared_credentials(
    where: str, provider: str, accounts: Mapping[str, ProviderSettings], env_default: bool
) -> None:
    """Two accounts with one client id would verify each other's callbacks: not two accounts."""
    key = _required_keys(provider)[0]

    def named(name: str) -> str:
        if name == DEFAULT_ACCOUNT and env_default:
            return f"the {provider.upper()}_* variables"
        return f"[{provider}.{name}]"

    seen: dict[str, str] = {}
    for name, settings in accounts.items():
        value = getattr(settings, key)
        if value is None:
            continue
        if value in seen:
            raise ConfigurationError(
                f"{where}: {named(seen[value])} and {named(name)} have the same {key}"
            )
        seen[value] = name


def warn_if_lax(settings: Settings) -> None:
    """Said once as a server starts: settings fit for a laptop, not for money."""
    if settings.events.allow_private:
        logging.getLogger("ipn.events").warning(
            "IPN_MERCHANT_ALLOW_PRIVATE is on: merchant endpoints may be plain http and "
            "loopback or private addresses; for local development only"
        )


def settings_or_exit(env: Mapping[str, str] | None = None) -> Settings:
    """Settings for a process's entry point: bad configuration stops it with one line on stderr
    naming the variable, instead of a traceback from deep inside a server's start-up."""
    try:
        return Settings.from_env(env)
    except ConfigurationError as exc:
        print(f"ipn: configuration error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


class _EnvReader:
    def __init__(self, env: Mapping[str, str], where: str | None = None) -> None:
        self.env = env
        # For an account of the accounts file: errors name its table and key, not a variable.
        self.where = where

    def label(self, name: str) -> str:
        if self.where is None:
            return name
        return f"{self.where} {name.split('_', 1)[1].lower()}"

    def text(self, name: str) -> str | None:
        value = self.env.get(name, "").strip()
        return value or None

    def integer(
        self, name: str, default: int, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigurationError(
                f"{self.label(name)} must be a whole number, not {raw!r}"
            ) from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum}" + (f" to {maximum}" if maximum is not None else " up")
            raise ConfigurationError(f"{self.label(name)} must be {bound}, not {value}")
        return value

    def number(self, name: str, default: float) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigurationError(f"{self.label(name)} must be a number, not {raw!r}") from None
        if value <= 0:
            raise ConfigurationError(f"{self.label(name)} must be positive, not {raw!r}")
        return value

    def flag(self, name: str, *, default: bool = False) -> bool:
        raw = (self.text(name) or ("1" if default else "0")).lower()
        if raw not in ("0", "1", "true", "false", "yes", "no"):
            raise ConfigurationError(f"{self.label(name)} must be 1 or 0, not {raw!r}")
        return raw in ("1", "true", "yes")

    def seconds_list(self, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
        """`5,300,1800`: whole seconds, at least one."""
        raw = self.text(name)
        if raw is None:
            return default
        parts = [part.strip() for part in raw.split(",")]
        if not all(part.isdigit() for part in parts):
            raise ConfigurationError(
                f"{self.label(name)} must look like 5,300,1800 (seconds), not {raw!r}"
            )
        return tuple(int(part) for part in parts)

    def url(self, name: str, default: str) -> str:
        value = self.text(name) or default
        if not value.startswith(("http://", "https://")):
            raise ConfigurationError(f"{self.label(name)} must be an http(s) URL, not {value!r}")
        return value.rstrip("/")

    def choice(self, name: str, choices: Mapping[str, str], default: str) -> str:
        raw = (self.text(name) or default).lower()
        if raw not in choices:
            raise ConfigurationError(
                f"{self.label(name)} must be one of {', '.join(choices)}, not {raw!r}"
            )
        return choices[raw]

    def poll_limit(self, name: str) -> tuple[int, str] | None:
        """`800/day` or `60/minute`."""
        raw = self.text(name)
        if raw is None:
            return None
        calls, _, period = raw.partition("/")
        if not calls.strip().isdigit() or period.strip() not in ("minute", "day"):
            raise ConfigurationError(
                f"{self.label(name)} must look like 800/day or 60/minute, not {raw!r}"
            )
        return int(calls), period.strip()

    def previous_secret(self, name: str) -> tuple[PreviousSecret, ...]:
        """`<PROVIDER>_PREVIOUS_SECRET` with `<PROVIDER>_PREVIOUS_SECRET_VALID_UNTIL`: the one
        replaced secret an account configured by the environment may still accept."""
        secret, until = self.text(name), self.text(f"{name}_VALID_UNTIL")
        if secret is None and until is None:
            return ()
        if secret is None or until is None:
            raise ConfigurationError(f"{name} and {name}_VALID_UNTIL must be set together")
        try:
            valid_until = datetime.fromisoformat(until.replace("Z", "+00:00"))
        except ValueError:
            valid_until = None
        if valid_until is None or valid_until.tzinfo is None:
            raise ConfigurationError(
                f"{name}_VALID_UNTIL must be a time with its offset, like "
                f"2027-01-31T00:00:00Z, not {until!r}"
            )
        return (PreviousSecret(secret, valid_until.astimezone(UTC)),)

    def poll_limits(
        self, name: str, defaults: Mapping[str, tuple[int, str]]
    ) -> dict[str, tuple[int, str]]:
        """`coinbarpay=800/day,cubepay=60/minute` on top of the defaults."""
        limits = dict(defaults)
        for part in (self.text(name) or "").split(","):
            if not part.strip():
                continue
            provider, _, rule = part.partition("=")
            calls, _, period = rule.partition("/")
            provider, period = provider.strip(), period.strip()
            if (
                provider not in PROVIDERS
                or not calls.strip().isdigit()
                or period
                not in (
                    "minute",
                    "day",
                )
            ):
                raise ConfigurationError(
                    f"{self.label(name)} must look like coinbarpay=800/day,cubepay=60/minute,"
                    f" not {part!r}"
                )
            limits[provider] = (int(calls), period)
        return limits

    def currency_ids(self, name: str, defaults: Mapping[str, int]) -> dict[str, int]:
        """`EUR=446,GBP=445` on top of the defaults."""
        ids = dict(defaults)
        raw = self.text(name)
        for part in (raw or "").split(","):
            if not part.strip():
                continue
            code, _, number = part.partition("=")
            if not code.strip() or not number.strip().isdigit():
                raise ConfigurationError(
                    f"{self.label(name)} must look like EUR=446,GBP=445, not {part!r}"
                )
            ids[code.strip().upper()] = int(number)
        return ids

    def networks(self, name: str) -> tuple[IPNetwork, ...]:
        raw = self.text(name)
        if raw is None:
            return ()
        try:
            return tuple(
                ipaddress.ip_network(part.strip(), strict=False)
                for part in raw.split(",")
                if part.strip()
            )
        except ValueError as exc:
            raise ConfigurationError(f"{self.label(name)}: {exc}") from None
