"""Who may see the dashboard: holders of ``Settings.admin_token``.

Two ways in: ``Authorization: Bearer <admin token>`` on every request (scripts, curl), or the login form, which
sets an HttpOnly, SameSite=Strict session cookie. The cookie holds an HMAC of a fixed label keyed with the
token, never the token itself, so changing the token ends every session. Forms that change something carry a
CSRF value (another HMAC of the token) that a cookie-authenticated POST must echo.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import Request

COOKIE = "pb_dashboard"
COOKIE_PATH = "/dashboard"
SESSION_MAX_AGE_S = 12 * 3600


def _mac(token: str, label: str) -> str:
    return hmac.new(token.encode(), label.encode(), hashlib.sha256).hexdigest()


def session_value(token: str) -> str:
    """The session cookie's value for ``token``."""
    return _mac(token, "passbridge-dashboard-session-v1")


def csrf_value(token: str) -> str:
    """The CSRF form value for ``token``."""
    return _mac(token, "passbridge-dashboard-csrf-v1")


def bearer_ok(request: Request, token: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>``."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def cookie_ok(request: Request, token: str) -> bool:
    """Whether the request carries a valid session cookie."""
    given = request.cookies.get(COOKIE, "")
    return bool(given) and hmac.compare_digest(given.encode(), session_value(token).encode())


def token_ok(given: str, token: str) -> bool:
    """Constant-time check of a token typed into the login form."""
    return hmac.compare_digest(given.strip().encode(), token.encode())


def csrf_ok(request: Request, token: str, form_value: str) -> bool:
    """A state-changing request is allowed: bearer-authenticated (no ambient credentials), or its form echoes
    the CSRF value."""
    if bearer_ok(request, token):
        return True
    return hmac.compare_digest(form_value.encode(), csrf_value(token).encode())
