"""Start the app under uvicorn: what ``bonexray serve`` runs."""
from __future__ import annotations

import ipaddress
import os

from ..errors import BonexrayError
from .uploads import UploadLimits

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def resolve_api_key(host: str, api_key: str | None) -> str | None:
    """The key from ``--api-key`` or the environment; required unless bound to loopback only."""
    from .app import API_KEY_ENV

    key = api_key or os.environ.get(API_KEY_ENV) or None
    if key is not None and len(key) < 8:
        raise BonexrayError("--api-key must have at least 8 characters")
    if key is None and not is_loopback(host):
        raise BonexrayError(
            f"--host {host} makes the API reachable from other machines: give --api-key KEY "
            f"(or set {API_KEY_ENV}); every API call must then send the header X-API-Key: KEY"
        )
    return key


def serve(model: str | None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device: str = "auto", limits: UploadLimits | None = None, metrics: str | None = None,
          scope_check: bool = True) -> None:
    import uvicorn

    from .app import create_app

    if not 0 < port < 65536:
        raise BonexrayError(f"--port {port}: not a TCP port (1-65535)")
    key = resolve_api_key(host, api_key)
    app = create_app(model, api_key=key, limits=limits, device=device, metrics=metrics, scope_check=scope_check)
    shown = f"[{host}]" if ":" in host else host
    print(f"bonexray serve: {app.state.model_path} on http://{shown}:{port}/ (API key {'required' if key else 'off'}; Ctrl+C stops)",
          flush=True)
    # One process: the model is loaded once and shared; the app serialises model calls itself.
    uvicorn.run(app, host=host, port=port, log_level="info", **uvicorn_settings())


#: Seconds a new connection may take to send its request line and headers; then it is closed.
HEADER_TIMEOUT_S = 10.0
#: Seconds an idle keep-alive connection stays open after a response.
KEEP_ALIVE_S = 5


def uvicorn_settings(header_timeout: float = HEADER_TIMEOUT_S) -> dict:
    """The uvicorn settings of ``bonexray serve`` (shared with the tests, which run the same server).

    Idle sockets must not lock other clients out (issue #24: 64 silent connections gave everyone 503s).
    uvicorn's ``limit_concurrency`` counts open *connections*, and it never times out a connection that
    sends nothing, so it is off here: a connection that has not sent its headers within ``header_timeout``
    is closed (:func:`header_timeout_protocol`), and the app itself bounds requests in progress
    (``create_app(max_requests=)``, a 503 beyond it).
    """
    return {"http": header_timeout_protocol(header_timeout), "limit_concurrency": None,
            "timeout_keep_alive": KEEP_ALIVE_S, "h11_max_incomplete_event_size": 16 * 1024, "server_header": False}


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, closing a connection whose first request has not arrived within ``seconds``."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(seconds, self._close_if_no_request)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and self._header_timer is not None:  # a request arrived in time
                self._header_timer.cancel()
                self._header_timer = None

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _close_if_no_request(self) -> None:
            self._header_timer = None
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11Protocol
