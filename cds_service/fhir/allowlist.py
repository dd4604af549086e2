"""Which FHIR servers the fallback may contact: URLs compared by their parsed parts, never as strings.

A string prefix lets `http://allowed:1@evil:2` (userinfo) or `http://allowed.example.evil.test`
through; here scheme, host (IDNA, case-insensitive, IPv6 literals), port (scheme defaults made
explicit) and path prefix (whole segments) must each match, and a URL with userinfo never passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class ServerURL:
    scheme: str
    host: str
    port: int
    path: tuple[str, ...]

    @classmethod
    def parse(cls, url: str) -> "ServerURL | None":
        """The URL's parts, or None for anything that is not a plain http(s) URL without credentials."""
        if not isinstance(url, str) or any(c in url for c in "\\\r\n\t "):
            return None
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError:
            return None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc or parts.query or parts.fragment:
            return None
        host = parts.hostname.rstrip(".")
        if ":" not in host:                    # IPv6 literals stay as they are; names go through IDNA
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                return None
        return cls(scheme, host.lower(), port or _DEFAULT_PORTS[scheme],
                   tuple(seg for seg in parts.path.split("/") if seg))

    def within(self, other: "ServerURL") -> bool:
        return (self.scheme, self.host, self.port) == (other.scheme, other.host, other.port) \
            and self.path[:len(other.path)] == other.path


class ServerAllowlist:
    """Parsed once from CDS_FHIR_ALLOWLIST; empty allows any server (but never one with credentials)."""

    def __init__(self, entries: tuple[str, ...] = ()):
        self.entries: list[ServerURL] = []
        for e in entries:
            parsed = ServerURL.parse(e)
            if parsed is None:
                raise ValueError(f"CDS_FHIR_ALLOWLIST: not an http(s) URL without credentials: {e!r}")
            self.entries.append(parsed)

    def allows(self, server: str) -> bool:
        url = ServerURL.parse(server)
        if url is None:
            return False
        return not self.entries or any(url.within(e) for e in self.entries)
