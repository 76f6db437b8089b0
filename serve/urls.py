"""URLs as we show them: every URL we print, log or record goes through :func:`masked`.

Database URLs (``postgresql+psycopg2://user:pw@host/db``), tracking URIs with basic-auth
credentials and pre-signed links carry secrets; logs, JSON result lines, MLflow params and
error messages must never show them.
"""

from __future__ import annotations

import re

MASK = "***"
# Query parameters that carry a secret (case-insensitive): libpq's password, pre-signed S3
# links (X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token), tokens and API keys.
_SECRET_PARAM = re.compile(
    r"(?i)(^|[&;])((?:password|passwd|pwd|secret|token|access_token|api_key|apikey|sig|"
    r"signature|x-amz-signature|x-amz-credential|x-amz-security-token|awsaccesskeyid)=)"
    r"[^&;#]*")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def masked(uri: str) -> str:
    """``uri`` with its password and secret query parameters replaced by ``***``.

    ``postgresql+psycopg2://mlflow:s3cr@t@db:5432/m?table=r`` ->
    ``postgresql+psycopg2://mlflow:***@db:5432/m?table=r``. Strings that are not URLs
    (local paths) come back unchanged. The user name stays: it is not a secret and it
    tells which login was used. A password with an unescaped ``@`` or ``/`` is masked
    whole.
    """
    if not isinstance(uri, str) or not uri:
        return uri
    m = _SCHEME.match(uri)
    if m:
        head, rest = uri[:m.end()], uri[m.end():]
        # The authority ends at the query/fragment; its user info at the last "@" before.
        end = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
        at = rest.rfind("@", 0, end)
        if at >= 0:
            user, sep, _ = rest[:at].partition(":")
            if sep and "/" not in user:
                rest = f"{user}:{MASK}{rest[at:]}"
        uri = head + rest
    base, sep, query = uri.partition("?")
    if sep:
        uri = f"{base}?{_SECRET_PARAM.sub(lambda p: p[1] + p[2] + MASK, query)}"
    return uri


def has_password(uri: str) -> bool:
    """Whether ``uri`` carries a password (in its user info or a secret query parameter)."""
    return isinstance(uri, str) and masked(uri) != uri
