from __future__ import annotations

import re
import tomllib
from pathlib import Path

import msgspec
import pytest

from controlplane import config as config_mod
from controlplane.config import Config
from controlplane.errors import ConfigError
from controlplane.secrets import EnvSecret, check_url, reveal

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.toml"


def test_example_config_decodes() -> None:
    config = config_mod.load(EXAMPLE)
    assert config.storage_backend == "sqlite"
    assert config.server.port == 8080
    assert config.flags.shadow is True
    assert [m.name for m in config.meters] == ["memory_gb_seconds"]
    assert config.auth.tokens[0].scopes == ["ingest", "read", "admin", "parity"]


def _documented_keys() -> set[str]:
    """Every `section.key` the example writes, including commented-out settings."""
    keys: set[str] = set()
    section = ""
    for line in EXAMPLE.read_text().splitlines():
        stripped = line.strip().lstrip("#").strip()
        head = re.match(r"^\[\[?([\w.]+)\]\]?", stripped)
        if head:
            section = head.group(1)
            continue
        kv = re.match(r"^(\w+)\s*=", stripped)
        if kv and section:
            keys.add(f"{section}.{kv.group(1)}")
    return keys


def _struct_keys(struct: type, prefix: str) -> set[str]:
    out: set[str] = set()
    info = msgspec.inspect.type_info(struct)
    for field in getattr(info, "fields", ()):
        out.add(f"{prefix}.{field.name}")
    return out


def test_every_setting_is_documented_in_the_example() -> None:
    from controlplane.config import (
        AuthConfig,
        FlagsConfig,
        LoggingConfig,
        ParityAlertConfig,
        ParityConfig,
        RollupConfig,
        SenderConfig,
        ServerConfig,
        TokenConfig,
    )
    from controlplane.meters import MeterConfig
    from controlplane.plans import PlanConfig
    from controlplane.plugins.ingest.redis_streams import RedisStreamsIngestConfig
    from controlplane.plugins.legacy.http import HTTPLegacyConfig
    from controlplane.plugins.legacy.sql import SQLLegacyConfig
    from controlplane.plugins.storage.sqlite import SQLiteStorageConfig

    expected = (
        _struct_keys(ServerConfig, "server")
        | _struct_keys(config_mod.EventsConfig, "events")
        | _struct_keys(RollupConfig, "rollup")
        | _struct_keys(SenderConfig, "sender")
        | _struct_keys(FlagsConfig, "flags")
        | _struct_keys(LoggingConfig, "logging")
        | _struct_keys(TokenConfig, "auth.tokens")
        | _struct_keys(MeterConfig, "meters")
        | _struct_keys(PlanConfig, "plans")
        | _struct_keys(SQLiteStorageConfig, "storage")
        | _struct_keys(ParityConfig, "parity")
        | _struct_keys(ParityAlertConfig, "parity.alert")
        | _struct_keys(config_mod.RateLimitConfig, "rate_limit")
        | _struct_keys(config_mod.JobsConfig, "jobs")
        | _struct_keys(SQLLegacyConfig, "legacy")
        | _struct_keys(HTTPLegacyConfig, "legacy")
        | _struct_keys(RedisStreamsIngestConfig, "ingest")
    )
    expected -= {"auth.tokens", "parity.alert"}  # the sections themselves
    missing = sorted(expected - _documented_keys())
    assert not missing, f"settings missing from config.example.toml: {missing}"
    assert {f.name for f in msgspec.inspect.type_info(AuthConfig).fields} == {"tokens"}  # type: ignore[attr-defined]
    top = {f.name for f in msgspec.inspect.type_info(Config).fields} - {"source"}  # type: ignore[attr-defined]
    example_sections = set(tomllib.loads(EXAMPLE.read_text()))
    assert top <= example_sections | {"billing", "legacy", "ingest"}, top - example_sections


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"storage": {"backend": "mysql"}},
            "storage.backend: expected one of ['postgres', 'sqlite'",
        ),
        ({"storage": {"backend": "sqlite", "pth": "x"}}, "storage.pth: unknown setting"),
        ({"server": {"port": "80"}}, "server.port: Expected `int`, got `str`"),
        ({"server": {"prot": 80}}, "server.prot: unknown setting"),
        ({"rollup": {"bucket_seconds": 7000}}, "rollup.bucket_seconds: must divide a day"),
        ({"storage": {"path": "x"}}, "storage.backend: required"),
        ({"meters": [{"name": "m", "event_type": "t"}]}, "meters[0] (m): `value` is required"),
        (
            {"meters": [{"name": "m", "event_type": "t", "value": "open('x')"}]},
            "meters[0] (m): unsupported syntax",
        ),
        (
            {"auth": {"tokens": [{"name": "a", "sha256": "x", "scopes": ["root"]}]}},
            "auth.tokens[0].scopes[0]",
        ),
        ({"billing": {"backend": "fake", "rate": 1}}, "billing.rate: unknown setting"),
        ({"rate_limit": {"events_per_second": -1}}, "rate_limit.events_per_second: must be"),
        ({"rate_limit": {"burst_events": 0}}, "rate_limit.burst_events: must be >= 1"),
        (
            {"auth": {"tokens": [{"name": "a", "sha256": "x", "scopes": [], "burst_events": 0}]}},
            "auth.tokens[0].burst_events: must be >= 1",
        ),
        ({"jobs": {"stale_after_intervals": -1}}, "jobs.stale_after_intervals: must be >= 0"),
        (
            {"stripe": {"plan_policy": {"paid": ["active", "incomplete"]}}},
            "stripe.plan_policy.paid: 'incomplete' is never paid",
        ),
        (
            {"stripe": {"plan_policy": {"paid": ["active", "past_due"]}}},
            "stripe.plan_policy: ['past_due'] both in paid and in grace_seconds",
        ),
        (
            {"stripe": {"plan_policy": {"grace_seconds": {"past_due": -1}}}},
            "stripe.plan_policy.grace_seconds.past_due: must be >= 0",
        ),
        (
            {"stripe": {"plan_policy": {"paid": ["actve"]}}},
            "stripe.plan_policy.paid[0]",
        ),
        ({"jobs": {"watch_interval_seconds": 0}}, "jobs.watch_interval_seconds: must be > 0"),
        ({"server": {"max_small_body_bytes": 0}}, "server.max_small_body_bytes: must be >= 1"),
        ({"server": {"event_time_min": -1}}, "server.event_time_min: must be unix seconds"),
        (
            {"server": {"event_time_max_ahead_seconds": -60}},
            "server.event_time_max_ahead_seconds: must be >= 0",
        ),
        (
            {"meters": [{"name": "m", "event_type": "t", "value": "-" * 5000 + "data.x"}]},
            "meters[0] (m): expression nested too deeply",
        ),
        (
            {
                "meters": [
                    {
                        "name": "m",
                        "event_type": "t",
                        "value": "data.x",
                        "where": "not " * 40 + "data.x",
                    }
                ]
            },
            "levels deep; at most 32",
        ),
    ],
)
def test_bad_config_names_the_setting(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_mod.parse(raw)
    assert message in str(err.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        config_mod.load(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"rolup": {}}, "rolup: unknown setting (did you mean 'rollup'?)"),
        ({"server": {"prot": 80}}, "server.prot: unknown setting (did you mean 'port'?)"),
        ({"parity": {"alert": {"relativ": 1}}}, "parity.alert.relativ: unknown setting (did "),
        ({"storage": {"backend": "sqlite", "pth": "x"}}, "(did you mean 'path'?)"),
        (
            {"meters": [{"name": "m", "event_type": "t", "aggregation": "summ"}]},
            "meters[0].aggregation: Invalid enum value 'summ' (expected one of 'sum', 'count', "
            "'time_weighted')",
        ),
        ({"logging": {"level": "loud"}}, "(expected one of 'debug', 'info', 'warning', 'error')"),
        ({"plans": [{"name": "pro", "billable": True}]}, "plans: 'free' (billable = false) and"),
        (
            {"plans": [{"name": "free", "billable": True}, {"name": "pro", "billable": True}]},
            "plans: 'free' (billable = false) and 'pro' (billable = true) are required",
        ),
        (
            {"legacy": {"backend": "http", "url": "http://l", "plan_map": {"ent": "gold"}}},
            "legacy.plan_map.ent: unknown plan 'gold'; known: ['free', 'pro']",
        ),
        ({"plans": [{"name": "free", "billable": "no"}]}, "plans[0].billable: Expected `bool`"),
    ],
)
def test_bad_config_suggests_the_nearest_setting_and_lists_allowed_values(
    raw: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        config_mod.parse(raw)
    assert message in str(err.value)


def test_a_setting_like_none_gets_no_suggestion() -> None:
    with pytest.raises(ConfigError) as err:
        config_mod.parse({"zzzz": 1})
    assert str(err.value) == "zzzz: unknown setting"


def test_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cp.toml"
    path.write_text("[rollup]\ngrace_secnds = 1\n")
    with pytest.raises(ConfigError) as err:
        config_mod.load(path)
    assert str(err.value) == (
        f"{path}: rollup.grace_secnds: unknown setting (did you mean 'grace_seconds'?)"
    )


def test_relative_paths_are_read_from_the_config_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "cp.toml").write_text(
        '[storage]\nbackend = "sqlite"\npath = "data/cp.db"\n'
        '[legacy]\nbackend = "sql"\ndsn = "sqlite:legacy.db"\nquery = "SELECT 1"\n'
        '[parity]\nmeter = "m"\n[[meters]]\nname = "m"\nevent_type = "t"\nvalue = "data.x"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = config_mod.load(Path("../conf/cp.toml"))
    assert config.storage.path == str(folder.resolve() / "data" / "cp.db")  # type: ignore[attr-defined]
    assert reveal(config.legacy.dsn, "dsn") == f"sqlite://{folder.resolve()}/legacy.db"  # type: ignore[union-attr]


def test_absolute_paths_and_memory_stay_as_written(tmp_path: Path) -> None:
    path = tmp_path / "cp.toml"
    path.write_text('[storage]\nbackend = "sqlite"\npath = ":memory:"\n')
    assert config_mod.load(path).storage.path == ":memory:"  # type: ignore[attr-defined]
    path.write_text('[storage]\nbackend = "sqlite"\npath = "/var/lib/cp.db"\n')
    assert config_mod.load(path).storage.path == "/var/lib/cp.db"  # type: ignore[attr-defined]


def test_the_config_file_is_found_by_env_then_folder_then_the_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(config_mod.ENV_CONFIG, raising=False)
    monkeypatch.chdir(tmp_path)
    assert config_mod.default_path() == config_mod.EXAMPLE  # a source checkout
    (tmp_path / "controlplane.toml").write_text("")
    assert config_mod.default_path() == Path("controlplane.toml")
    monkeypatch.setenv(config_mod.ENV_CONFIG, str(tmp_path / "named.toml"))
    assert config_mod.default_path() == tmp_path / "named.toml"


def test_without_any_config_file_the_error_says_how_to_name_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(config_mod.ENV_CONFIG, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config_mod, "EXAMPLE", tmp_path / "installed" / "config.example.toml")
    with pytest.raises(ConfigError, match="pass --config, set \\$CONTROLPLANE_CONFIG"):
        config_mod.load()


def test_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CP_TEST_SECRET", "s3cret")
    assert reveal(EnvSecret(env="CP_TEST_SECRET"), "x") == "s3cret"
    monkeypatch.delenv("CP_TEST_SECRET")
    with pytest.raises(ConfigError) as err:
        reveal(EnvSecret(env="CP_TEST_SECRET"), "billing.api_key")
    assert str(err.value) == "billing.api_key: environment variable CP_TEST_SECRET is not set"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:p@127.0.0.1:5432/db",
        "postgresql:///db?host=/var/run/postgresql",
        "postgresql://u:p@[::1]:5432/db",
        "postgresql://u:p@host1:5432,host2:5433/db",
        "postgresql://u:p%2Fx%23y@h/db",
        "redis://:pw@h:6379/0",
        "rediss://h",
        "unix:///run/redis.sock",
    ],
)
def test_urls_users_write_are_accepted(url: str) -> None:
    check_url(url, "storage.dsn")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://alice:Sup3rS3cret/x@127.0.0.1:5432/db",
        "postgresql://alice:Xq9#Zr7@127.0.0.1/db",
        "postgresql://alice:1234/5678@127.0.0.1:5432/db",
        "redis://carol:RedX9pw/abc@127.0.0.1:6379/0",
    ],
)
def test_a_url_that_does_not_parse_is_refused_without_quoting_it(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^storage.dsn: .*percent-encode") as err:
        check_url(url, "storage.dsn")
    for piece in ("Sup3rS3cret", "Xq9", "Zr7", "1234", "5678", "RedX9pw", "alice", "carol"):
        assert piece not in str(err.value)


def test_token_hash_may_come_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from controlplane.auth import TokenStore, digest

    monkeypatch.setenv("CP_TOKEN_SHA", digest("abc"))
    config = config_mod.parse(
        {
            "auth": {
                "tokens": [{"name": "ops", "sha256": {"env": "CP_TOKEN_SHA"}, "scopes": ["read"]}]
            }
        }
    )
    assert TokenStore(config.auth).authenticate("Bearer abc").name == "ops"
