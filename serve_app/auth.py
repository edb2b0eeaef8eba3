"""Optional bearer-token auth of the HTTP entrance.

The token comes from the file named by ``AppArgs.auth_token_file`` (read on the entrance replica's node;
surrounding whitespace stripped), else from the ``PARTSERVE_TOKEN`` environment variable of the replica's
process; with neither, auth is off. The token is never logged, put in a Serve config or in an error.

With a token, every route but the health checks (``/v2/health/live``, ``/v2/health/ready``: probes carry no
credentials) needs ``Authorization: Bearer <token>``; others answer 401 with ``WWW-Authenticate: Bearer``
before the body is read. Tokens are compared in constant time (``hmac.compare_digest``).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping

from partitions.errors import PartserveError

TOKEN_ENV = "PARTSERVE_TOKEN"
SCHEME = "bearer"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="partserve"'}
"""Headers of a 401 answer."""


class AuthConfigError(PartserveError):
    """The token file is missing, unreadable or empty."""


def load_token(token_file: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The expected token: the content of ``token_file`` if given, else ``$PARTSERVE_TOKEN``; None: auth off."""
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise AuthConfigError(
                f"cannot read the auth token file {token_file!r} ({type(exc).__name__})",
                "pass a readable UTF-8 file holding the token",
            ) from exc
        if not token:
            raise AuthConfigError(f"the auth token file {token_file!r} is empty", "write the token into it")
        return token
    return environ.get(TOKEN_ENV) or None


def authorized(header: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header value grants access; always True when ``token`` is None."""
    if token is None:
        return True
    scheme, _, given = (header or "").strip().partition(" ")
    if scheme.lower() != SCHEME:
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())
