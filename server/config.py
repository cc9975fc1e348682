"""The bootstrap service's configuration: one frozen dataclass, built by the entry point only."""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.tls import TlsConfig

DEFAULT_PORT = 8998


@dataclass(frozen=True)
class BootstrapConfig:
    """Settings of one bootstrap service (flags of `pdmesh bootstrap`, or `PDMESH_BOOTSTRAP_*`)."""

    host: str = "127.0.0.1"
    """Address to listen on (`0.0.0.0` for every interface)."""
    port: int = DEFAULT_PORT
    """Port to listen on; 0 picks a free one. A port already served fails the start."""
    room_ttl_s: float = 120.0
    """How long a room record lives unless removed (a decode that never came must not leak it)."""
    max_rooms: int = 1 << 20
    """Most room records held at once; beyond, RegisterRoom is RESOURCE_EXHAUSTED."""
    max_waiters: int = 1 << 16
    """Most lookups waiting at once (all streams and long polls together)."""
    max_instances: int = 1024
    """Most prefill instances registered at once."""
    instance_ttl_s: float = 0.0
    """Forget an instance not seen (registered or heartbeat) for this long; 0 never forgets."""
    heartbeat_interval_s: float = 2.0
    """How often instances are told to heartbeat (RegisterInstanceResponse)."""
    default_wait_s: float = 30.0
    """A wait with no wait_timeout_ms (and no shorter caller deadline) ends after this long."""
    max_wait_s: float = 600.0
    """No wait lasts longer than this, whatever the caller asks."""
    grace_s: float = 2.0
    """On SIGTERM or Ctrl-C, calls in flight get this long to finish."""
    tls: TlsConfig | None = None
    """Serve TLS (mTLS when it requires client certificates); None serves plaintext."""
    metrics_port: int | None = None
    """Serve Prometheus /metrics on this port (0 = a free one); None: no metrics endpoint."""
    metrics_host: str | None = None
    """Address of the /metrics endpoint; None: `host`."""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        for name in ("room_ttl_s", "heartbeat_interval_s", "default_wait_s", "max_wait_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("max_rooms", "max_waiters", "max_instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.instance_ttl_s < 0 or self.grace_s < 0:
            raise ValueError("instance_ttl_s and grace_s must not be negative")
