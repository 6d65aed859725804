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
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False,
                limit_concurrency=64, timeout_keep_alive=5)
