"""Bearer tokens -> tenants.

Tokens file: one `TENANT TOKEN` pair per line; TOKEN is the token itself or
`sha256:<hex digest of the token>` so the file need not hold secrets. `#` starts a
comment. Tokens are compared in constant time and never logged."""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

from hotlora.adapters.errors import InvalidArgument, Unauthenticated

DEV_TENANT = "default"
_TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class TokenAuthenticator:
    def __init__(self, entries: list[tuple[str, bytes]] | None):
        # entries: (tenant, sha256 digest of the token); None = single-tenant dev mode
        self._entries = entries

    @property
    def dev_mode(self) -> bool:
        return self._entries is None

    @classmethod
    def dev(cls) -> TokenAuthenticator:
        return cls(None)

    @classmethod
    def from_file(cls, path: str | Path) -> TokenAuthenticator:
        entries = []
        first_line: dict[bytes, tuple[int, str]] = {}  # digest -> (line, tenant) where it was first listed
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise InvalidArgument(f"{path}:{n}: expected `TENANT TOKEN`, got {len(parts)} fields")
            tenant, token = parts
            if not _TENANT_RE.match(tenant):
                raise InvalidArgument(f"{path}:{n}: tenant names match [a-z0-9][a-z0-9._-]{{0,63}}")
            if token.startswith("sha256:"):
                hexdigest = token[len("sha256:") :]
                if not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
                    raise InvalidArgument(f"{path}:{n}: sha256: must be followed by 64 hex digits")
                digest = bytes.fromhex(hexdigest)
            else:
                digest = hashlib.sha256(token.encode()).digest()
            if digest in first_line:
                # one token naming two tenants would silently belong to one of them: refuse to guess
                line_no, other = first_line[digest]
                raise InvalidArgument(
                    f"{path}:{n}: this token (or its sha256) is already listed on line {line_no} "
                    f"for tenant {other!r}; each token may appear once"
                )
            first_line[digest] = (n, tenant)
            entries.append((tenant, digest))
        if not entries:
            raise InvalidArgument(f"{path}: no tokens; remove --tokens-file for single-tenant dev mode")
        return cls(entries)

    def tenant_for(self, metadata) -> str:
        """metadata: the call's invocation metadata (key/value pairs)."""
        if self._entries is None:
            return DEV_TENANT
        header = None
        for key, value in metadata or ():
            if key == "authorization":
                header = value
                break
        if not header:
            raise Unauthenticated("missing `authorization: Bearer <token>` metadata")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata must be `Bearer <token>`")
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for tenant, expected in self._entries:  # check every entry: no early exit, constant time
            if hmac.compare_digest(digest, expected):
                found = tenant
        if found is None:
            raise Unauthenticated("unknown token")
        return found
