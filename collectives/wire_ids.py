"""Identifiers on the wire (peer ids, group ids, addresses, op keys) and their checks; ``collectives.wire``
re-exports every name here."""

import re

from collectives.errors import WireError

PEER_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
GROUP_RE = re.compile(r"[a-z0-9]{1,40}")
ADDR_RE = re.compile(r"tcp://[A-Za-z0-9_.:\[\]-]{1,256}:[0-9]{1,5}")


def check_peer_id(value: str) -> str:
    if not isinstance(value, str) or not PEER_ID_RE.fullmatch(value):
        raise WireError(f"invalid peer id {value!r:.80}")
    return value


def clip(text: str, max_bytes: int = 500) -> str:
    """Shorten free text (reasons) to at most ``max_bytes`` UTF-8 bytes, never splitting a character."""
    return text.encode("utf-8", "replace")[:max_bytes].decode("utf-8", "ignore")


def check_group(value: str) -> str:
    if not isinstance(value, str) or not GROUP_RE.fullmatch(value):
        raise WireError(f"invalid group id {value!r:.80}")
    return value


def check_addr(value: str) -> str:
    if not isinstance(value, str) or not ADDR_RE.fullmatch(value):
        raise WireError(f"invalid address {value!r:.80}")
    return value


def op_key(epoch: int, group: str, seq: int) -> str:
    return f"{epoch}:{group}:{seq}"


def parse_op_key(key: str) -> tuple[int, str, int]:
    try:
        e, g, s = key.split(":")
        return int(e), g, int(s)
    except ValueError:
        raise WireError(f"bad op key {key!r:.80}") from None
