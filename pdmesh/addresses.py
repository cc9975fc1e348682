"""Checking a `host:port` address that arrives in a request, before any channel is opened to it.

A service that is told where a peer lives (the router's AddInstance, a decode's prefill bootstrap
address) checks the address first: a malformed one is INVALID_ARGUMENT (reason INVALID_ADDRESS)
and nothing is created, rather than a channel that can never connect, a slow resolver failure,
or an exception from deep inside grpc.
"""

from __future__ import annotations

from pdmesh.errors import InvalidArgument
from pdmesh.reasons import Reason

MAX_ADDRESS_CHARS = 262  # a 255-character host name, ':' and a port


def validate_address(address: str, field: str = "address") -> str:
    """Return `address` if it is `host:port` (port 1..65535; `[v6]:port` works), else raise
    INVALID_ARGUMENT (reason INVALID_ADDRESS) naming `field`."""
    host, sep, port = address.rpartition(":")
    if (not sep or not host or len(address) > MAX_ADDRESS_CHARS or not port.isascii()
            or not port.isdigit() or not 0 < int(port) < 65536
            or not host.isprintable() or any(c.isspace() or c in "/?#@" for c in host)):
        raise InvalidArgument(f"{field} must be host:port (port 1..65535), got {address[:80]!r}",
                              reason=Reason.INVALID_ADDRESS, metadata={"field": field,
                                                                  "address": address[:80]})
    return address
