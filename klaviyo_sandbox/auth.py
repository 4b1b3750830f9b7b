"""Who is calling: private API keys, and OAuth (authorize → code → token with PKCE S256, refresh, revoke).

The sandbox's authorize endpoint approves at once (or denies, per client config) and redirects to the client's
``redirect_uri`` with ``code`` and ``state``. Access tokens expire after ``access_token_ttl_s``. Tokens and keys
are compared by dictionary lookup of their SHA-256 so no secret is kept in logs or reprs.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlencode

from klaviyo_sandbox.config import ALL_SCOPES, AccountConfig, OAuthClientConfig

CODE_TTL_S = 600.0


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the account, the OAuth client (None for private keys), granted scopes."""

    account_id: str
    client_id: str | None
    scopes: frozenset[str]


@dataclass
class _Grant:
    account_id: str
    client_id: str
    scopes: frozenset[str]
    expires: float
    redirect_uri: str = ""
    code_challenge: str = ""
    refresh_digest: str = ""


@dataclass
class OAuthError(Exception):
    """An RFC 6749 error answer (``{"error", "error_description"}``)."""

    status: int
    error: str
    description: str


@dataclass
class Credentials:
    """Keys, OAuth clients and live tokens for every account."""

    ttl_s: float
    rotate_refresh: bool = False
    _keys: dict[str, Principal] = field(default_factory=dict)
    _clients: dict[str, tuple[str, OAuthClientConfig]] = field(default_factory=dict)
    _codes: dict[str, _Grant] = field(default_factory=dict)
    _access: dict[str, _Grant] = field(default_factory=dict)
    _refresh: dict[str, _Grant] = field(default_factory=dict)

    def add_account(self, account: AccountConfig) -> None:
        """Register an account's keys and OAuth clients."""
        for key in account.api_keys:
            scopes = ALL_SCOPES if key.scopes is None else frozenset(key.scopes)
            self._keys[_digest(key.key)] = Principal(account.account_id, None, scopes)
        for client in account.oauth_clients:
            self._clients[client.client_id] = (account.account_id, client)

    def by_api_key(self, key: str) -> Principal | None:
        """The principal of a private key."""
        return self._keys.get(_digest(key))

    def by_access_token(self, token: str, now: float) -> Principal | None:
        """The principal of a live access token (None when unknown, revoked or expired)."""
        grant = self._access.get(_digest(token))
        if grant is None:
            return None
        if grant.expires <= now:
            del self._access[_digest(token)]
            return None
        return Principal(grant.account_id, grant.client_id, grant.scopes)

    # -- OAuth endpoints ------------------------------------------------------------------------------------

    def client(self, client_id: str) -> tuple[str, OAuthClientConfig] | None:
        """(account id, client config) of a registered OAuth client."""
        return self._clients.get(client_id)

    def authorize(
        self,
        client_id: str,
        redirect_uri: str,
        scope: str,
        state: str | None,
        code_challenge: str,
        method: str,
        now: float,
    ) -> str:
        """The redirect URL for an authorize request (approved with a code, or denied)."""
        found = self._clients.get(client_id)
        if found is None:
            raise OAuthError(400, "invalid_client", "Unknown client_id.")
        account_id, client = found
        if client.redirect_uris and redirect_uri not in client.redirect_uris:
            raise OAuthError(400, "invalid_request", "redirect_uri is not registered for this client.")
        params: dict[str, str] = {}
        if state is not None:
            params["state"] = state
        if not client.approve:
            params["error"] = "access_denied"
            params["error_description"] = "The user denied the request."
        elif method != "S256" or not code_challenge:
            params["error"] = "invalid_request"
            params["error_description"] = "PKCE with code_challenge_method=S256 is required."
        else:
            requested = frozenset(scope.split()) if scope else client.scopes
            unknown = requested - client.scopes
            if unknown:
                params["error"] = "invalid_scope"
                params["error_description"] = f"Scopes not allowed: {' '.join(sorted(unknown))}"
            else:
                code = secrets.token_urlsafe(24)
                self._codes[_digest(code)] = _Grant(
                    account_id,
                    client_id,
                    requested,
                    now + CODE_TTL_S,
                    redirect_uri=redirect_uri,
                    code_challenge=code_challenge,
                )
                params["code"] = code
        sep = "&" if "?" in redirect_uri else "?"
        return f"{redirect_uri}{sep}{urlencode(params)}"

    def check_client(self, client_id: str, client_secret: str) -> OAuthClientConfig:
        """The client for a token/revoke call, or ``invalid_client``."""
        found = self._clients.get(client_id)
        if found is None or not secrets.compare_digest(found[1].client_secret, client_secret):
            raise OAuthError(401, "invalid_client", "Client authentication failed.")
        return found[1]

    def exchange_code(
        self, client_id: str, code: str, redirect_uri: str, verifier: str, now: float
    ) -> dict[str, object]:
        """``grant_type=authorization_code``: the code (single use) for tokens, after the PKCE check."""
        grant = self._codes.pop(_digest(code), None)
        if grant is None or grant.client_id != client_id or grant.expires <= now:
            raise OAuthError(400, "invalid_grant", "The authorization code is invalid or expired.")
        if grant.redirect_uri != redirect_uri:
            raise OAuthError(400, "invalid_grant", "redirect_uri does not match the authorize request.")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
        if not verifier or not secrets.compare_digest(challenge, grant.code_challenge):
            raise OAuthError(400, "invalid_grant", "code_verifier does not match the code_challenge.")
        refresh = secrets.token_urlsafe(32)
        grant.refresh_digest = _digest(refresh)
        self._refresh[grant.refresh_digest] = grant
        return self._issue(grant, refresh, now)

    def refresh(self, client_id: str, refresh_token: str, now: float) -> dict[str, object]:
        """``grant_type=refresh_token``: a new access token (and, when configured, a rotated refresh token)."""
        grant = self._refresh.get(_digest(refresh_token))
        if grant is None or grant.client_id != client_id:
            raise OAuthError(400, "invalid_grant", "The refresh token is invalid or revoked.")
        if self.rotate_refresh:
            del self._refresh[grant.refresh_digest]
            refresh_token = secrets.token_urlsafe(32)
            grant.refresh_digest = _digest(refresh_token)
            self._refresh[grant.refresh_digest] = grant
        return self._issue(grant, refresh_token, now)

    def _issue(self, grant: _Grant, refresh_token: str, now: float) -> dict[str, object]:
        access = secrets.token_urlsafe(32)
        self._access[_digest(access)] = _Grant(
            grant.account_id,
            grant.client_id,
            grant.scopes,
            now + self.ttl_s,
            refresh_digest=grant.refresh_digest,
        )
        return {
            "access_token": access,
            "refresh_token": refresh_token,
            "token_type": "Bearer",
            "expires_in": int(self.ttl_s) if self.ttl_s >= 1 else self.ttl_s,
            "scope": " ".join(sorted(grant.scopes)),
        }

    def revoke(self, client_id: str, token: str) -> None:
        """Revoke an access token, or a refresh token together with every access token issued from it."""
        digest = _digest(token)
        grant = self._access.get(digest)
        if grant is not None and grant.client_id == client_id:
            del self._access[digest]
            return
        grant = self._refresh.get(digest)
        if grant is not None and grant.client_id == client_id:
            del self._refresh[digest]
            for key in [k for k, g in self._access.items() if g.refresh_digest == digest]:
                del self._access[key]

    def expire_access_tokens(self) -> int:
        """Make every live access token expired (tests of refresh-on-401); returns how many."""
        n = len(self._access)
        for grant in self._access.values():
            grant.expires = 0.0
        return n
