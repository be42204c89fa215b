from __future__ import annotations

import pytest

from controlplane.auth import Forbidden, TokenStore, Unauthorized, create_token, digest
from controlplane.config import AuthConfig, TokenConfig
from controlplane.errors import InvalidInput


def store() -> TokenStore:
    return TokenStore(
        AuthConfig(
            tokens=[
                TokenConfig(name="ingester", sha256=digest("a"), scopes=["ingest"]),
                TokenConfig(name="admin", sha256=digest("b").upper(), scopes=["admin", "read"]),
            ]
        )
    )


def test_scopes() -> None:
    s = store()
    assert s.authorize("Bearer a", "ingest").name == "ingester"
    assert s.authorize("bearer b", "admin").name == "admin"  # hash compared case-insensitively
    with pytest.raises(Forbidden, match="lacks the 'admin' scope"):
        s.authorize("Bearer a", "admin")
    for header in (None, "", "Basic a", "Bearer nope"):
        with pytest.raises(Unauthorized):
            s.authorize(header, "ingest")


@pytest.mark.parametrize(
    "header", ["Bearer \xff\xfe", "Bearer \udcff\ud800", "Bearer " + "9" * 100_000, "\x00"]
)
def test_undecodable_or_huge_tokens_are_unknown_not_an_error(header: str) -> None:
    with pytest.raises(Unauthorized):
        store().authorize(header, "ingest")


def test_create_token_prints_config_that_accepts_it() -> None:
    import tomllib

    token, lines = create_token("ci", ["ingest", "read"])
    raw = tomllib.loads(lines)["auth"]["tokens"][0]
    assert raw["sha256"] == digest(token) and token not in lines
    s = TokenStore(AuthConfig(tokens=[TokenConfig(**raw)]))
    assert s.authorize(f"Bearer {token}", "read").name == "ci"
    with pytest.raises(InvalidInput, match="unknown"):
        create_token("x", ["root"])
