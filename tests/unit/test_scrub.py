"""The blackboard's scrubber, as a table: what a post becomes, and which rule fired (None: untouched)."""

from __future__ import annotations

import pytest

from meshllm.state.scrub import scrub

PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA1c2\nabcDEF123==\n-----END RSA PRIVATE KEY-----"

CASES: list[tuple[str, str, str | None]] = [
    # -- replaced ------------------------------------------------------------------------------
    ("mail alice.smith@example.com about it", "mail [EMAIL] about it", "email"),
    ("cc: bob+ci@mail.example.co.uk, thanks", "cc: [EMAIL], thanks", "email"),
    ("key sk-proj-Abcdefghijklmnop1234 leaked", "key [API KEY] leaked", "api_key"),
    ("OPENAI sk-abcdefghijklmnopqrstuvwx", "OPENAI [API KEY]", "api_key"),
    ("anthropic sk-ant-api03-AbCdEfGhIjKlMnOp", "anthropic [API KEY]", "api_key"),
    ("token ghp_16C7e42F292c6912E7710c838347Ae178B4a in ci", "token [API KEY] in ci", "api_key"),
    ("gho_16C7e42F292c6912E7710c838347Ae178B4a", "[API KEY]", "api_key"),
    ("pat github_pat_11ABCDEFG0123456789_abcdefghij", "pat [API KEY]", "api_key"),
    ("slack xoxb-1234567890-abcdefghij", "slack [API KEY]", "api_key"),
    ("slack xoxp-1234-5678-abcdefghijkl here", "slack [API KEY] here", "api_key"),
    ("aws AKIAIOSFODNN7EXAMPLE ok", "aws [API KEY] ok", "api_key"),
    ("hf token hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345", "hf token [API KEY]", "api_key"),
    ("curl -H 'Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc'", "curl -H 'Authorization: Bearer [TOKEN]'",
     "bearer"),
    ("bearer abcdefgh12345678", "bearer [TOKEN]", "bearer"),
    (f"my key:\n{PEM}\nbye", "my key:\n[PRIVATE KEY]\nbye", "private_key"),
    ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC", "[PRIVATE KEY]", "private_key"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----", "[PRIVATE KEY]",
     "private_key"),
    ("see /home/alice/src/meshllm", "see /home/[USER]/src/meshllm", "home_path"),
    ("at /Users/Bob.Jones/Library/Logs", "at /Users/[USER]/Library/Logs", "home_path"),
    ("C:\\Users\\carol\\AppData\\x.log", "C:\\Users\\[USER]\\AppData\\x.log", "home_path"),
    ("C:/Users/dave/Desktop", "C:/Users/[USER]/Desktop", "home_path"),
    ("node at 192.168.1.20 is down", "node at [IP] is down", "ip_address"),
    ("dial 10.0.0.7:4433 now", "dial [IP]:4433 now", "ip_address"),
    ("ipv6 2001:db8:85a3::8a2e:370:7334 flaps", "ipv6 [IP] flaps", "ip_address"),
    ("link-local fe80::1ff:fe23:4567:890a", "link-local [IP]", "ip_address"),
    ("password=hunter2 in the config", "password=[REDACTED] in the config", "assignment"),
    ("DB_PASSWORD = 'pa ss' oops", "DB_PASSWORD = [REDACTED] oops", "assignment"),
    ("secret=abc123&x=1", "secret=[REDACTED]&x=1", "assignment"),
    ('{"api_key": "abc123", "model": "x"}', '{"api_key": [REDACTED], "model": "x"}', "assignment"),
    ("token: s3cr3t-value", "token: [REDACTED]", "assignment"),
    ("https://admin:pa55w0rd@git.example.com/repo.git", "https://[CREDENTIALS]@git.example.com/repo.git",
     "url_credentials"),
    ("redis://user:secret@localhost:6379/0", "redis://[CREDENTIALS]@localhost:6379/0", "url_credentials"),
    ("session Zx9Qw8Er7Ty6Ui5Op4As3Df2Gh1Jk0Lm stuck", "session [SECRET] stuck", "high_entropy"),
    ("the invite is mZ3kQ8vR2xL9pW4tY7nB1cD6fH0jG5sA", "the invite is [SECRET]", "high_entropy"),
    # -- kept as they are ----------------------------------------------------------------------
    ("STATUS: [org/repo branch:main] refactoring billing", "STATUS: [org/repo branch:main] refactoring billing", None),
    ("llama.cpp v1.2.3.4 and version 10.0.0.1", "llama.cpp v1.2.3.4 and version 10.0.0.1", None),
    ("python 3.11.7, pycrdt 0.14.13", "python 3.11.7, pycrdt 0.14.13", None),
    ("fixed in commit 3f2a9c1 (see 03c65b0e4d1f2a3b4c5d6e7f8091a2b3c4d5e6f7)",
     "fixed in commit 3f2a9c1 (see 03c65b0e4d1f2a3b4c5d6e7f8091a2b3c4d5e6f7)", None),
    ("sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
     "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", None),
    ("id 123e4567-e89b-12d3-a456-426614174000", "id 123e4567-e89b-12d3-a456-426614174000", None),
    ("docs at https://example.com/docs/v2?page=3#intro", "docs at https://example.com/docs/v2?page=3#intro", None),
    ("clone git@github.com:org/repo.git", "clone git@github.com:org/repo.git", None),
    ("binds 127.0.0.1:9337 and 0.0.0.0", "binds 127.0.0.1:9337 and 0.0.0.0", None),
    ("loopback ::1 only", "loopback ::1 only", None),
    ("meeting at 12:30:45 today", "meeting at 12:30:45 today", None),
    ("C++ std::vector and Foo::bar", "C++ std::vector and Foo::bar", None),
    ("ServedModelReconciler and PlacementReconciler", "ServedModelReconciler and PlacementReconciler", None),
    ("path src/meshllm/state/board_search_ranking.py", "path src/meshllm/state/board_search_ranking.py", None),
    ("npm react@18.2.0 and @types/node", "npm react@18.2.0 and @types/node", None),
    ("the password policy needs review", "the password policy needs review", None),
    ("/home/ is empty on this box", "/home/ is empty on this box", None),
    ("QUESTION: why does sk-learn fail?", "QUESTION: why does sk-learn fail?", None),
    ("tokenizer=llama and secretive mode", "tokenizer=llama and secretive mode", None),
    ("ratio 0.83x at 1.2 ms/token", "ratio 0.83x at 1.2 ms/token", None),
]


@pytest.mark.parametrize(("text", "expected", "rule"), CASES, ids=[c[0][:40] for c in CASES])
def test_scrub_table(text: str, expected: str, rule: str | None) -> None:
    result = scrub(text)
    assert result.text == expected
    assert list(result.found) == ([rule] if rule else [])


def test_the_table_is_big_and_has_cases_that_must_not_change() -> None:
    assert len(CASES) >= 40
    assert sum(1 for _, _, rule in CASES if rule is None) >= 15


def test_counts_every_replacement_and_summarises_them() -> None:
    result = scrub("a@example.com, b@example.org at 10.1.2.3 with ghp_16C7e42F292c6912E7710c838347Ae178B4a")
    assert result.text == "[EMAIL], [EMAIL] at [IP] with [API KEY]"
    assert result.found == {"api_key": 1, "email": 2, "ip_address": 1}
    assert result.summary() == "1 api_key, 2 email, 1 ip_address"


def test_scrubbing_twice_changes_nothing_more() -> None:
    once = scrub(f"password=x {PEM} alice@example.com /home/alice 192.168.0.1")
    again = scrub(once.text)
    assert again.text == once.text and not again.changed
