"""Configuration of the OpenAI-compatible HTTP target, checked before any request is sent."""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from replay.core.errors import ReplayError

ENDPOINTS = ("completions", "chat")


@dataclass(frozen=True)
class HTTPTargetConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = None  # None: the first id from GET {base_url}/models
    # More model names requests ask for (a --classes mix's adapters): checked against GET /models at
    # start, so a typo fails in one line before any load instead of as a run of HTTP 404s.
    also_models: tuple[str, ...] = ()
    endpoint: str = "completions"  # or "chat"
    api_key_env: str | None = None  # name of the environment variable holding the key
    vllm_extensions: bool | None = None  # None: detect (GET /version, or models owned_by "vllm")
    connect_timeout_s: float = 10.0
    first_token_timeout_s: float = 120.0
    stall_timeout_s: float = 60.0
    total_timeout_s: float = 900.0
    pool_size: int = 0  # connections; 0: unlimited, so the pool never queues an open-loop request
    allow_remote: bool = False  # load tests target loopback only unless this is set
    name: str = "openai-http"

    def problems(self) -> list[str]:
        """Every problem with this config, each one line naming the field."""
        out: list[str] = []
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            out.append(f"base_url: expected http(s)://host:port/v1, got {self.base_url!r}")
        elif not self.allow_remote and not is_loopback(parts.hostname):
            out.append(
                f"base_url: {parts.hostname} is not a loopback address; load tests only target "
                "127.0.0.1/localhost/::1 unless allow_remote = true"
            )
        if self.endpoint not in ENDPOINTS:
            out.append(f"endpoint: must be 'completions' or 'chat', got {self.endpoint!r}")
        for f in ("connect_timeout_s", "first_token_timeout_s", "stall_timeout_s", "total_timeout_s"):
            v = getattr(self, f)
            if not (isinstance(v, int | float) and v > 0):
                out.append(f"{f}: must be a positive number of seconds, got {v!r}")
        if not isinstance(self.pool_size, int) or self.pool_size < 0:
            out.append(f"pool_size: must be an integer >= 0 (0: unlimited), got {self.pool_size!r}")
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "target") -> HTTPTargetConfig:
        """From a TOML table; unknown keys are errors (a typo must not silently fall back to a default)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            names = ", ".join(unknown)
            raise ReplayError(f"{source}: unknown key(s) {names}; known: {', '.join(sorted(known))}")
        return cls(**d)


def is_loopback(host: str) -> bool:
    """Load goes only to this machine unless a user opts out: localhost or a loopback IP."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
