"""Scrubbing of personal data and secrets from blackboard posts, on the posting node, before anything
enters the replicated board.

A post leaves the machine the moment it is written into the board document, and every node of the
mesh keeps a copy for two days, so whatever must not spread is replaced here, where the poster can
still see it: ``scrub`` returns the cleaned text and what it replaced, and the poster is told.

What goes, in this order (each rule sees the text the rules before it left):

=================  =====================================================  ======================
rule               matches                                                becomes
=================  =====================================================  ======================
private_key        PEM private key blocks (to the END line, or the end)    ``[PRIVATE KEY]``
url_credentials    ``scheme://user:password@`` in a URL                    ``scheme://[CREDENTIALS]@``
bearer             ``Bearer <token>``                                      ``Bearer [TOKEN]``
api_key            ``sk-…``, ``ghp_…`` (and gho/ghu/ghs/ghr), ``github_pat_…``, ``[API KEY]``
                   ``xox?-…`` (Slack), ``AKIA…``/``ASIA…`` (AWS), ``hf_…``
assignment         the value of ``password=``, ``secret=``, ``token=``,     ``key=[REDACTED]``
                   ``api_key=`` and kin (``=``, or ``:`` after a quoted or
                   line-leading key)
email              addresses (``git@host:`` SSH remotes excepted)          ``[EMAIL]``
home_path          the user name in ``/home/NAME``, ``/Users/NAME``,       ``/home/[USER]``
                   ``C:\\Users\\NAME``
ip_address         IPv4 and IPv6 addresses, loopback and unspecified       ``[IP]``
                   (127.x, 0.0.0.0, ::1, ::) excepted; dotted numbers
                   after ``v`` or ``version`` are versions
high_entropy       words of 20+ characters mixing upper case, lower case   ``[SECRET]``
                   and digits with high character entropy; hexadecimal
                   (commit hashes, digests) and UUIDs are kept
=================  =====================================================  ======================

It errs on the side of replacing: a post that loses a random-looking word is cheap, a key that
spreads to every node is not. Version numbers, commit hashes, loopback addresses and URLs without
credentials stay (``tests/unit/test_scrub.py`` holds the table).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ScrubResult", "scrub"]

_PEM = re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|\Z)", re.S)
_URL_CREDENTIALS = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/@:]+:[^\s/@]+@")
_BEARER = re.compile(r"\b(Bearer)\s+[A-Za-z0-9._~+/=-]{8,}", re.I)
_API_KEY = re.compile(
    r"(?<![A-Za-z0-9_-])(?:sk-(?:proj-|ant-|live-|test-)?[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|github_pat_[A-Za-z0-9_]{20,}|xox[abposr]-[A-Za-z0-9-]{10,}|(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|hf_[A-Za-z0-9]{30,})(?![A-Za-z0-9_-])")
_SECRET_KEYS = (r"password|passwd|pwd|passphrase|secret|client_secret|secret_key|token|access_token"
                r"|auth_token|refresh_token|api_key|apikey|api-key|access_key|private_key")
_ASSIGN_EQ = re.compile(rf"(?i)\b((?:[A-Za-z0-9]+[_.-])*(?:{_SECRET_KEYS}))(\s*=\s*)(\"[^\"\n]*\"|'[^'\n]*'|[^\s,;&]+)")
_ASSIGN_COLON = re.compile(
    rf"(?im)((?:^[ \t]*|[\"'])(?:[A-Za-z0-9]+[_.-])*(?:{_SECRET_KEYS})[\"']?)(\s*:\s*)(\"[^\"\n]*\"|'[^'\n]*'|[^\s,;&}}]+)")
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b(:?)")
_HOME = re.compile(r"(/home/|/Users/|[A-Za-z]:[\\/]+Users[\\/]+)([^\s/\\:\"'`]+)")
_IPV4 = re.compile(r"(?<![\w.])(v|version\s*)?((?:\d{1,3}\.){3}\d{1,3})(?![\w.]*\d)", re.I)
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")  # checked by ipaddress
_WORD = re.compile(r"[A-Za-z0-9+/=_-]{20,}")
_HEX_OR_UUID = re.compile(r"[0-9a-fA-F]+|[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


@dataclass(frozen=True)
class ScrubResult:
    """The cleaned text and how many of each kind were replaced (rule name -> count)."""

    text: str
    found: dict[str, int]

    @property
    def changed(self) -> bool:
        return bool(self.found)

    def summary(self) -> str:
        """``2 email, 1 api_key``: what the poster is told; empty when nothing was replaced."""
        return ", ".join(f"{count} {rule}" for rule, count in self.found.items())


def _ip_ok(text: str) -> bool:
    """A real address that says something about a network (not loopback or unspecified)."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return False
    return not (addr.is_loopback or addr.is_unspecified)


def _ipv4(match: re.Match[str]) -> str | None:
    if match.group(1) or not _ip_ok(match.group(2)):
        return None
    return "[IP]"


def _ipv6(match: re.Match[str]) -> str | None:
    text = match.group(0)
    if not any(ch.isdigit() for ch in text) or (text.count(":") < 2) or not _ip_ok(text):
        return None  # ``dead::beef``-like words and times (12:30:45) are not addresses
    return "[IP]"


def _entropy(word: str) -> float:
    counts = Counter(word)
    return -sum(n / len(word) * math.log2(n / len(word)) for n in counts.values())


def _high_entropy(match: re.Match[str]) -> str | None:
    word = match.group(0)
    core = word.strip("=-_")
    if _HEX_OR_UUID.fullmatch(core):
        return None  # commit hashes, digests and ids are not secrets
    if not (any(c.isupper() for c in core) and any(c.islower() for c in core) and any(c.isdigit() for c in core)):
        return None
    if _entropy(core) < (3.5 if len(core) >= 32 else 3.8):
        return None
    return "[SECRET]"


def _email(match: re.Match[str]) -> str | None:
    if match.group(1) and match.group(0).lower().startswith("git@"):
        return None  # git@github.com:org/repo is an SSH remote, nobody's address
    return "[EMAIL]" + match.group(1)


Replacement = Callable[[re.Match[str]], str | None]
_RULES: tuple[tuple[str, re.Pattern[str], Replacement], ...] = (
    ("private_key", _PEM, lambda m: "[PRIVATE KEY]"),
    ("url_credentials", _URL_CREDENTIALS, lambda m: m.group(1) + "[CREDENTIALS]@"),
    ("bearer", _BEARER, lambda m: m.group(1) + " [TOKEN]"),
    ("api_key", _API_KEY, lambda m: "[API KEY]"),
    ("assignment", _ASSIGN_EQ,
     lambda m: None if m.group(3).startswith("[") else m.group(1) + m.group(2) + "[REDACTED]"),
    ("assignment", _ASSIGN_COLON,
     lambda m: None if m.group(3).strip("\"'").startswith("[") else m.group(1) + m.group(2) + "[REDACTED]"),
    ("email", _EMAIL, _email),
    ("home_path", _HOME, lambda m: None if m.group(2).startswith("[") else m.group(1) + "[USER]"),
    ("ip_address", _IPV4, _ipv4),
    ("ip_address", _IPV6, _ipv6),
    ("high_entropy", _WORD, _high_entropy),
)


def scrub(text: str) -> ScrubResult:
    """``text`` with every match of the rules above replaced, and the count of each rule's replacements."""
    found: dict[str, int] = {}
    for rule, pattern, replace in _RULES:
        def substitute(match: re.Match[str], rule: str = rule, replace: Replacement = replace) -> str:
            new = replace(match)
            if new is None:
                return match.group(0)
            found[rule] = found.get(rule, 0) + 1
            return new
        text = pattern.sub(substitute, text)
    return ScrubResult(text=text, found=found)
