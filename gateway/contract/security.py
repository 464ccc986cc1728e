"""Access control: API tokens, compared in constant time.

When `api_keys` is configured (`GATEWAY_API_KEYS=key1,key2`), `/recommendation` (and
`/metrics` with `metrics_require_token`) need the header `X-Api-Token` with one of them;
`/healthz`, `/readyz` and the docs stay open.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from pydantic import SecretStr

__all__ = ["TOKEN_HEADER", "TokenCheck"]

TOKEN_HEADER = "X-Api-Token"
# RFC 9110 section 5.6.3: OWS = *( SP / HTAB )
_OPTIONAL_WHITESPACE = " \t"


class TokenCheck:
    """Whether a presented token is one of the configured API keys."""

    def __init__(self, keys: Sequence[SecretStr]):
        self._keys = [key.get_secret_value().encode() for key in keys]

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (otherwise every request is let through)."""
        return bool(self._keys)

    def allows(self, token: str) -> bool:
        """Compare `token` with every key, in time that does not depend on where they differ.

        Spaces and tabs around the value are not part of it (RFC 9110 section 5.5: optional
        whitespace around a field value is not part of the value), whichever HTTP parser
        delivered it; anything inside the value, case included, must match exactly.
        """
        presented = token.strip(_OPTIONAL_WHITESPACE).encode()
        matched = False
        for key in self._keys:
            # No early exit: which key matched, or how many were tried, must not show in timing.
            matched |= hmac.compare_digest(presented, key)
        return matched
