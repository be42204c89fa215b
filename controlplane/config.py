"""Configuration: one TOML file decoded into typed structs.

Every section and key is checked: an unknown key, a wrong type or an unknown plugin name fails
at startup with the exact path (``storage.backend: expected one of ['postgres', 'sqlite']``).
Plugin sections (`storage`, `billing`, `[[ingest]]`, `legacy`) are decoded with the config
struct of the plugin their `backend` names, found through :mod:`controlplane.registry`.
Secrets may be read from the environment, see :mod:`controlplane.secrets`.
"""

from __future__ import annotations

import difflib
import enum
import os
import re
import tomllib
import types
import typing
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import msgspec

from controlplane import registry
from controlplane.errors import ConfigError
from controlplane.interfaces import PluginConfig, StorageConfig
from controlplane.meters import MeterConfig
from controlplane.plans import DEFAULT_PLANS, FREE, PRO, PlanConfig
from controlplane.secrets import Secret

Scope = Literal["ingest", "read", "admin", "parity"]
SCOPES: tuple[Scope, ...] = ("ingest", "read", "admin", "parity")


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class ServerConfig(_Section, frozen=True):
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 10 * 1024 * 1024
    max_batch_events: int = 10_000
    migrate_on_start: bool = True
    max_small_body_bytes: int = 1024 * 1024  # every body but ingest: flags, orgs, webhooks, ...
    metrics_require_token: bool = False  # GET /metrics needs a token with the `read` scope
    # the event times ingest accepts (`time` and `ts` alike): 2000-01-01 on, a day ahead at most
    event_time_min: int = 946_684_800
    event_time_max_ahead_seconds: int = 86_400


class EventsConfig(_Section, frozen=True):
    """What ingest does with usage events, whichever source they come from."""

    # an event whose type no meter reads: "accept" (stored, counted as unmetered in the
    # answer and the metrics) or "reject" (its batch is refused, 422, naming event and type)
    unknown_types: Literal["accept", "reject"] = "accept"


class TokenConfig(_Section, frozen=True):
    name: str
    sha256: Secret  # hex sha256 of the token, never the token itself
    scopes: list[Scope]
    events_per_second: float | None = None  # overrides [rate_limit] for this token
    burst_events: int | None = None


class AuthConfig(_Section, frozen=True):
    tokens: list[TokenConfig] = []


class RateLimitConfig(_Section, frozen=True):
    """Per-token limit on `POST /v1/events` (`[rate_limit]`): a token bucket of events."""

    events_per_second: float = 0.0  # 0: no limit
    burst_events: int = 20_000


class JobsConfig(_Section, frozen=True):
    """Health of the scheduled jobs (`[jobs]`): readiness and alerts."""

    stale_after_intervals: float = 3.0  # 0: never unready for a stale job
    alert_after_failures: int = 3  # failed passes in a row that raise an alert
    suppress_seconds: int = 3600  # at most one alert per job in this window
    watch_interval_seconds: float = 60.0  # how often `serve` checks the jobs


class ReconcileConfig(_Section, frozen=True):
    """Reconciling the ledger with the provider's aggregates (`controlplane.reconcile`)."""

    interval_seconds: float = 3600.0  # how often `serve` reconciles (0: never)
    settle_seconds: int = 3600  # hours younger than this are not compared yet
    window_hours: int = 48  # a scheduled pass compares the last N settled hours
    tolerance_units: int = 0  # an alert when units short or over exceed it
    # after a scheduled pass: "report" leaves repairs to a person (`reconcile repair`),
    # "resend" re-issues the rows the provider lacks (see controlplane.reconcile)
    repair: Literal["report", "resend"] = "report"


class RollupConfig(_Section, frozen=True):
    bucket_seconds: int = 3600
    grace_seconds: int = 600
    interval_seconds: float = 60.0
    batch_buckets: int = 5000  # dirty buckets per transaction
    legacy_plan_seconds: float = 3600.0  # how long a legacy biller's plan answer is reused


class SenderConfig(_Section, frozen=True):
    interval_seconds: float = 30.0
    batch_size: int = 500
    concurrency: int = 8  # calls in flight across customers
    ambiguous_after_seconds: int = 23 * 3600  # stop resending blind before the 24 h dedupe ends
    claim_seconds: int = 300  # a sender's hold on the rows it reads; a dead one's lapses


class FlagsConfig(_Section, frozen=True):
    shadow: bool | None = None
    bill_from: int | None = None
    authority: str | None = None


class LoggingConfig(_Section, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class ParityAlertConfig(_Section, frozen=True):
    """When the checker alerts: material drift (> `relative` and >= `min_units`) on at least
    `min_orgs` orgs, or on the total, for `consecutive_buckets` buckets in a row."""

    relative: Decimal = Decimal("0.10")
    min_units: Decimal = Decimal("100")
    min_orgs: int = 3
    consecutive_buckets: int = 2
    webhook_url: Secret | None = None  # Slack-compatible: POST {"text", "dedup_key"}
    suppress_seconds: int = 21600
    timeout_seconds: float = 10.0


class ParityConfig(_Section, frozen=True):
    meter: str = "memory_gb_seconds"
    tolerance: Decimal = Decimal("0.02")  # per-org relative drift still counted as agreeing
    hmac_secret: Secret | None = None  # for X-Timestamp / X-Signature requests
    settle_seconds: int = 7200  # a bucket is checked once it ended this long ago
    interval_seconds: float = 300.0  # how often `serve` runs the checker
    backfill_buckets: int = 24  # on its first pass, the checker starts this many buckets back
    alert: ParityAlertConfig = ParityAlertConfig()
    # money parity: per-org invoice drift still counted as agreeing (relative; 0: not a cent)
    money_tolerance: Decimal = Decimal("0")


class CatalogProductConfig(_Section, frozen=True):
    """A provider product (`[[catalog.products]]`); its Stripe id is ``prod_cp_<key>``."""

    key: str
    name: str


class CatalogPriceConfig(_Section, frozen=True):
    """A provider price (`[[catalog.prices]]`): metered when `meter` names a configured meter,
    else a licensed (flat, per-period) fee. `unit_amount` is in the currency's major unit
    ("0.0004" dollars), as a decimal string: never a float."""

    key: str
    product: str
    lookup_key: str
    unit_amount: Decimal
    currency: str = "usd"
    interval: Literal["day", "week", "month", "year"] = "month"
    meter: str | None = None


class WelcomeCreditConfig(_Section, frozen=True):
    """The billing credit every newly provisioned org receives once (`[catalog.welcome_credit]`)."""

    amount: Decimal  # major units, e.g. "10.00"
    currency: str = "usd"
    name: str = "Welcome credit"
    expires_after_days: int | None = None


class CatalogConfig(_Section, frozen=True):
    products: list[CatalogProductConfig] = []
    prices: list[CatalogPriceConfig] = []
    welcome_credit: WelcomeCreditConfig | None = None


class CutoverConfig(_Section, frozen=True):
    """Cutover preflight (`[cutover]`)."""

    parity_clean_hours: int = 24  # parity must have been clean this long, up to now
    cancel_window_seconds: int = 86400  # rollback cancels rows sent less than this long ago
    sender_wait_seconds: float = 30.0  # rollback waits this long for send passes to stop
    require_money_parity: bool = False  # preflight: the last closed month's invoices agree


class AuditConfig(_Section, frozen=True):
    """Signing of the audit chain (`controlplane audit verify` checks it)."""

    algorithm: Literal["hmac-sha256", "ed25519"] = "hmac-sha256"
    key: Secret | None = None  # hmac: the shared secret; ed25519: the private key (hex)
    public_key: str | None = None  # ed25519 (hex): enough to verify, cannot sign
    # Records before this id may be unsigned (written before `key` was set); from it on, every
    # record must carry a valid signature. None: every record must be signed.
    signed_from: int | None = None


SubscriptionStatus = Literal[
    "incomplete",
    "incomplete_expired",
    "trialing",
    "active",
    "past_due",
    "canceled",
    "unpaid",
    "paused",
]
SUBSCRIPTION_STATUSES: tuple[str, ...] = typing.get_args(SubscriptionStatus)


class PlanPolicyConfig(_Section, frozen=True):
    """`[stripe.plan_policy]`: what an org's Stripe subscription status means for its plan.

    An org is on the paid plan while its subscription is in `paid`; a status in
    `grace_seconds` keeps the paid plan that long after the status was reported, then free;
    every other status moves a paid org to free (and leaves any other org's plan alone)."""

    paid: list[SubscriptionStatus] = msgspec.field(default_factory=lambda: ["active", "trialing"])
    grace_seconds: dict[SubscriptionStatus, int] = msgspec.field(
        default_factory=lambda: {"past_due": 7 * 86_400}
    )


class StripeConfig(_Section, frozen=True):
    """Stripe webhooks (`POST /webhooks/stripe`) and thin events (`POST /webhooks/stripe/thin`)."""

    webhook_secret: Secret | None = None  # the endpoint's whsec_... signing secret
    webhook_tolerance_seconds: int = 300
    plan_policy: PlanPolicyConfig = PlanPolicyConfig()
    # the event destination's whsec_... secret (thin events, `POST /webhooks/stripe/thin`)
    event_destination_secret: Secret | None = None


class LegacyPluginConfig(PluginConfig, kw_only=True, frozen=True):
    """Base of every legacy source's config section (`[legacy]`)."""

    # the legacy biller's plan names -> configured plans (a name that is one needs no entry)
    plan_map: dict[str, str] = {}


class CapabilityKeyConfig(_Section, frozen=True):
    """One ``[[capabilities.keys]]`` entry: the first listed signs, every one verifies."""

    kid: str
    private_key: Secret  # an Ed25519 private key, PEM (PKCS #8), best from the environment


class CapabilitiesConfig(_Section, frozen=True):
    """Capability tokens (`controlplane.capabilities`)."""

    keys: list[CapabilityKeyConfig] = []
    lifetime_seconds: int = 3600
    audience: str = "controlplane"
    issuer: str = "controlplane"
    max_skew_seconds: int = 60
    # event types that need a token once the control plane is the billing authority
    required_for: list[str] = []


class Config(_Section, frozen=True):
    server: ServerConfig = ServerConfig()
    events: EventsConfig = EventsConfig()
    storage: PluginConfig = PluginConfig()  # replaced by the chosen plugin's config
    auth: AuthConfig = AuthConfig()
    rollup: RollupConfig = RollupConfig()
    sender: SenderConfig = SenderConfig()
    flags: FlagsConfig = FlagsConfig()
    billing: PluginConfig | None = None
    meters: list[MeterConfig] = []
    plans: list[PlanConfig] = msgspec.field(default_factory=lambda: list(DEFAULT_PLANS))
    logging: LoggingConfig = LoggingConfig()
    legacy: PluginConfig | None = None
    ingest: list[PluginConfig] = []  # `[[ingest]]`: each decoded by its plugin's config
    parity: ParityConfig = ParityConfig()
    catalog: CatalogConfig = CatalogConfig()
    stripe: StripeConfig = StripeConfig()
    cutover: CutoverConfig = CutoverConfig()
    audit: AuditConfig = AuditConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()
    jobs: JobsConfig = JobsConfig()
    capabilities: CapabilitiesConfig = CapabilitiesConfig()
    reconcile: ReconcileConfig = ReconcileConfig()
    source: str = ""  # the file it was read from

    @property
    def storage_backend(self) -> str:
        return backend_of(self.storage)

    @property
    def storage_where(self) -> str:
        """Where the configured storage keeps the data (no secrets): a path, a database."""
        if isinstance(self.storage, StorageConfig):
            return self.storage.where()
        return self.storage_backend


PLUGIN_SECTIONS: dict[str, registry.Kind] = {
    "storage": "storage",
    "billing": "billing",
    "legacy": "legacy",
}
PLUGIN_LISTS: dict[str, registry.Kind] = {"ingest": "ingest"}  # `[[ingest]]`: several plugins
DEFAULTS: dict[str, dict[str, Any]] = {"storage": {"backend": "sqlite"}}

_MSGSPEC_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN = re.compile(
    r"Object (?P<what>contains unknown|missing required) field `(?P<field>[^`]+)`"
)


def backend_of(plugin_config: PluginConfig) -> str:
    """The plugin name a config section selects (its `backend` tag)."""
    info = msgspec.inspect.type_info(type(plugin_config))
    tag = getattr(info, "tag", None)
    return str(tag) if tag is not None else ""


def _explain(exc: msgspec.ValidationError, prefix: str, root: type) -> ConfigError:
    """`storage.path: Expected str, got int` from msgspec's message and path, with the nearest
    known setting for an unknown one and the allowed values for a bad choice. `root` is the
    struct decoded at `prefix`."""
    match = _MSGSPEC_PATH.match(str(exc))
    msg = match.group("msg") if match else str(exc)
    inner = ((match.group("path") or "") if match else "").replace("$", "").lstrip(".")
    unknown = _UNKNOWN.match(msg)
    if unknown:
        field = unknown.group("field")
        if unknown.group("what") == "contains unknown":
            msg = "unknown setting" + _nearest(field, _settings_of(_type_at(root, inner)))
        else:
            msg = "required"
        inner = f"{inner}.{field}" if inner else field
    elif msg.startswith("Invalid enum value"):
        choices = _choices(_type_at(root, inner))
        if choices:
            msg += f" (expected one of {', '.join(repr(c) for c in choices)})"
    path = ".".join(p for p in (prefix, inner) if p).replace(".[", "[")
    return ConfigError(f"{path}: {msg}" if path else msg)


_STEP = re.compile(r"[^.\[\]]+|\[\d+\]")


def _type_at(root: Any, path: str) -> Any:
    """The type of the setting at `path` (`parity.alert.relative`, `meters[0].aggregation`)
    under the struct type `root`, or None when it cannot be told."""
    tp = root
    for step in _STEP.findall(path):
        tp = _strip_none(tp)
        if step.startswith("["):
            args = typing.get_args(tp)
            tp = args[0] if args else None
        elif isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            tp = {f.encode_name: f.type for f in msgspec.structs.fields(tp)}.get(step)
        else:
            return None
    return _strip_none(tp)


def _strip_none(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _settings_of(tp: Any) -> list[str]:
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return [f.encode_name for f in msgspec.structs.fields(tp)]
    return []


def _choices(tp: Any) -> list[Any]:
    if typing.get_origin(tp) is Literal:
        return list(typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return [member.value for member in tp]
    return []


def _nearest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _decode_plugin(section: str, raw: Any, kind: registry.Kind) -> PluginConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: expected a table")
    name = raw.get("backend")
    if not isinstance(name, str):
        known = registry.names(kind)
        raise ConfigError(f"{section}.backend: required, one of {known}")
    spec = registry.spec_for(kind, name)
    try:
        decoded = msgspec.convert(raw, spec.config)
    except msgspec.ValidationError as exc:
        raise _explain(exc, section, spec.config) from exc
    if not isinstance(decoded, PluginConfig):
        raise ConfigError(f"{section}: plugin {name!r} has no PluginConfig")
    return decoded


def _decode_plugins(section: str, raw: Any, kind: registry.Kind) -> list[PluginConfig]:
    """A list of plugin tables (`[[ingest]]`); errors name the entry: `ingest[0].stream`."""
    if not isinstance(raw, list):
        raise ConfigError(f"{section}: expected a list of tables ([[{section}]])")
    out: list[PluginConfig] = []
    for i, item in enumerate(raw):
        where = f"{section}[{i}]"
        name = item.get("backend") if isinstance(item, dict) else None
        if isinstance(name, str) and name not in registry.names(kind):
            raise ConfigError(
                f"{where}.backend: expected one of {registry.names(kind)}, got {name!r}"
            )
        out.append(_decode_plugin(where, item, kind))
    return out


def parse(raw: dict[str, Any], source: str = "") -> Config:
    """Decode a config mapping (as read from TOML)."""
    raw = dict(raw)
    plugins: dict[str, PluginConfig | list[PluginConfig]] = {}
    for section, kind in PLUGIN_SECTIONS.items():
        value = raw.pop(section, DEFAULTS.get(section))
        if value is not None:
            plugins[section] = _decode_plugin(section, value, kind)
    for section, kind in PLUGIN_LISTS.items():
        if section in raw:
            plugins[section] = _decode_plugins(section, raw.pop(section), kind)
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise _explain(exc, "", Config) from exc
    config = msgspec.structs.replace(config, source=source, **plugins)
    _check(config)
    return config


def _check(config: Config) -> None:
    rollup = config.rollup
    if rollup.bucket_seconds <= 0 or 86400 % rollup.bucket_seconds:
        raise ConfigError("rollup.bucket_seconds: must divide a day (e.g. 60, 300, 3600)")
    if rollup.grace_seconds < 0:
        raise ConfigError("rollup.grace_seconds: must be >= 0")
    names = [t.name for t in config.auth.tokens]
    if len(set(names)) != len(names):
        raise ConfigError("auth.tokens: token names must be unique")
    from controlplane.meters import MeterSet

    MeterSet(config.meters, config.rollup.bucket_seconds)  # compiles every expression
    _check_plans(config)
    _check_capabilities(config)
    _check_limits(config)
    _check_parity(config)
    _check_catalog(config)
    _check_plan_policy(config.stripe.plan_policy)


def _check_plans(config: Config) -> None:
    names = [p.name for p in config.plans]
    if len(set(names)) != len(names):
        raise ConfigError("plans: plan names must be unique")
    billable = {p.name: p.billable for p in config.plans}
    if billable.get(FREE) is not False or billable.get(PRO) is not True:
        raise ConfigError(
            f"plans: {FREE!r} (billable = false) and {PRO!r} (billable = true) are required: "
            "orgs no one gave a plan are free, and the Stripe webhooks provision pro"
        )
    keys = [price.key for price in config.catalog.prices]
    for i, entry in enumerate(config.plans):
        for j, key in enumerate(entry.prices):
            if key not in keys:
                raise ConfigError(
                    f"plans[{i}].prices[{j}]: no [[catalog.prices]] entry has key {key!r}"
                    + _nearest(key, keys)
                )
    legacy = config.legacy
    if isinstance(legacy, LegacyPluginConfig):
        for answer, plan in sorted(legacy.plan_map.items()):
            if plan not in billable:
                raise ConfigError(
                    f"legacy.plan_map.{answer}: unknown plan {plan!r}; known: {sorted(billable)}"
                )


def _check_capabilities(config: Config) -> None:
    caps = config.capabilities
    if caps.lifetime_seconds < 1:
        raise ConfigError("capabilities.lifetime_seconds: must be >= 1")
    if caps.max_skew_seconds < 0:
        raise ConfigError("capabilities.max_skew_seconds: must be >= 0")
    kids = [k.kid for k in caps.keys]
    if len(set(kids)) != len(kids) or not all(kids):
        raise ConfigError("capabilities.keys: each kid must be unique and non-empty")


def _check_limits(config: Config) -> None:
    server = config.server
    for key in ("max_body_bytes", "max_small_body_bytes", "max_batch_events"):
        if getattr(server, key) < 1:
            raise ConfigError(f"server.{key}: must be >= 1")
    if not 0 <= server.event_time_min <= 253_402_300_799:
        # before 1970, buckets would start at negative times
        raise ConfigError("server.event_time_min: must be unix seconds, 0 (1970) to year 9999")
    if server.event_time_max_ahead_seconds < 0:
        raise ConfigError("server.event_time_max_ahead_seconds: must be >= 0")
    limits: list[tuple[str, float | None, int | None]] = [
        ("rate_limit", config.rate_limit.events_per_second, config.rate_limit.burst_events)
    ]
    limits += [
        (f"auth.tokens[{i}]", t.events_per_second, t.burst_events)
        for i, t in enumerate(config.auth.tokens)
    ]
    for where, rate, burst in limits:
        if rate is not None and not 0 <= rate < float("inf"):
            raise ConfigError(f"{where}.events_per_second: must be >= 0 (0: no limit)")
        if burst is not None and burst < 1:
            raise ConfigError(f"{where}.burst_events: must be >= 1")
    jobs = config.jobs
    if not 0 <= jobs.stale_after_intervals < float("inf"):
        raise ConfigError("jobs.stale_after_intervals: must be >= 0 (0: never unready)")
    if jobs.alert_after_failures < 0:
        raise ConfigError("jobs.alert_after_failures: must be >= 0 (0: never alert)")
    if jobs.suppress_seconds < 0:
        raise ConfigError("jobs.suppress_seconds: must be >= 0")
    if jobs.watch_interval_seconds <= 0:
        raise ConfigError("jobs.watch_interval_seconds: must be > 0")


def _check_parity(config: Config) -> None:
    parity = config.parity
    if parity.tolerance < 0:
        raise ConfigError("parity.tolerance: must be >= 0 (0.02 is 2 %)")
    if parity.money_tolerance < 0 or not parity.money_tolerance.is_finite():
        raise ConfigError("parity.money_tolerance: must be >= 0 (0.005 is 0.5 %)")
    for key in ("settle_seconds", "backfill_buckets"):
        if getattr(parity, key) < 0:
            raise ConfigError(f"parity.{key}: must be >= 0")
    if parity.interval_seconds <= 0:
        raise ConfigError("parity.interval_seconds: must be > 0")
    alert = parity.alert
    if alert.relative < 0 or alert.min_units < 0:
        raise ConfigError("parity.alert: relative and min_units must be >= 0")
    for key in ("min_orgs", "consecutive_buckets"):
        if getattr(alert, key) < 1:
            raise ConfigError(f"parity.alert.{key}: must be >= 1")
    if alert.suppress_seconds < 0 or alert.timeout_seconds <= 0:
        raise ConfigError("parity.alert: suppress_seconds >= 0 and timeout_seconds > 0")
    if config.legacy is not None and parity.meter not in {m.name for m in config.meters}:
        raise ConfigError(
            f"parity.meter: no meter named {parity.meter!r}; "
            f"known: {sorted(m.name for m in config.meters)}"
        )


def _check_plan_policy(policy: PlanPolicyConfig) -> None:
    where = "stripe.plan_policy"
    if len(set(policy.paid)) != len(policy.paid):
        raise ConfigError(f"{where}.paid: each status at most once")
    for status in ("incomplete", "incomplete_expired"):
        if status in policy.paid:
            raise ConfigError(
                f"{where}.paid: {status!r} is never paid (its first invoice is not paid)"
            )
    both = sorted(set(policy.paid) & set(policy.grace_seconds))
    if both:
        raise ConfigError(f"{where}: {both} both in paid and in grace_seconds; choose one")
    for status, seconds in policy.grace_seconds.items():
        if seconds < 0:
            raise ConfigError(f"{where}.grace_seconds.{status}: must be >= 0")


def _check_catalog(config: Config) -> None:
    catalog = config.catalog
    meters = {m.name for m in config.meters}
    for what, keys in (
        ("products", [p.key for p in catalog.products]),
        ("prices", [p.key for p in catalog.prices]),
        ("prices.lookup_key", [p.lookup_key for p in catalog.prices]),
    ):
        if len(set(keys)) != len(keys):
            raise ConfigError(f"catalog.{what}: keys must be unique")
    products = {p.key for p in catalog.products}
    for i, price in enumerate(catalog.prices):
        where = f"catalog.prices[{i}]"
        if price.product not in products:
            raise ConfigError(f"{where}.product: no product with key {price.product!r}")
        if price.meter is not None and price.meter not in meters:
            raise ConfigError(
                f"{where}.meter: no meter named {price.meter!r}; known: {sorted(meters)}"
            )
        if price.unit_amount < 0 or not price.unit_amount.is_finite():
            raise ConfigError(f"{where}.unit_amount: must be a decimal >= 0")
        if not 0 < len(price.lookup_key) <= 200:
            raise ConfigError(f"{where}.lookup_key: 1 to 200 characters")
    credit = catalog.welcome_credit
    if credit is not None:
        if not credit.amount.is_finite() or credit.amount <= 0:
            raise ConfigError("catalog.welcome_credit.amount: must be a decimal > 0")
        if credit.expires_after_days is not None and credit.expires_after_days <= 0:
            raise ConfigError("catalog.welcome_credit.expires_after_days: must be > 0")
    if config.stripe.webhook_tolerance_seconds <= 0:
        raise ConfigError("stripe.webhook_tolerance_seconds: must be > 0")


ENV_CONFIG = "CONTROLPLANE_CONFIG"
EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"  # in a checkout


def default_path() -> Path:
    """The config file used without ``--config``: ``$CONTROLPLANE_CONFIG``, else
    ``./controlplane.toml``, else the repository's ``config.example.toml`` (in a source
    checkout). Raises ConfigError when there is none."""
    named = os.environ.get(ENV_CONFIG)
    if named:
        return Path(named)
    local = Path("controlplane.toml")
    if local.exists():
        return local
    if EXAMPLE.exists():
        return EXAMPLE
    raise ConfigError(
        f"no config file: pass --config, set ${ENV_CONFIG}, or create ./controlplane.toml"
    )


def load(path: str | Path | None = None) -> Config:
    """Read and check the config file; raises ConfigError naming the file and the bad
    setting. Relative paths in it (``storage.path``, a ``sqlite:`` legacy DSN) are read
    from the file's folder, wherever the command runs."""
    file = Path(path) if path else default_path()
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {file}: {exc.strerror}") from exc
    try:
        raw = tomllib.loads(text)
        return parse(_paths_from(raw, file.resolve().parent), source=str(file))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: {exc}") from exc
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from exc


def _paths_from(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`raw` with the relative file paths it names made absolute against `folder`."""
    storage = raw.get("storage")
    if isinstance(storage, dict) and storage.get("backend", "sqlite") == "sqlite":
        path = storage.get("path")
        if isinstance(path, str) and path != ":memory:" and not Path(path).is_absolute():
            raw = {**raw, "storage": {**storage, "path": str(folder / path)}}
    legacy = raw.get("legacy")
    if isinstance(legacy, dict) and isinstance(legacy.get("dsn"), str):
        dsn: str = legacy["dsn"]
        scheme, _, rest = dsn.partition(":")
        if scheme == "sqlite" and rest and not rest.startswith("/"):  # sqlite:relative/path
            raw = {**raw, "legacy": {**legacy, "dsn": f"sqlite://{folder / rest}"}}
    return raw
