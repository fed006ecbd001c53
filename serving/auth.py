"""API keys: from an environment variable (comma-separated) and/or a file (one key per line).

When no key is configured, the API is open. When any is, every ``/v1/*`` request needs
``Authorization: Bearer <key>``; ``/healthz`` and the web page's static files stay open. The file is
re-read when it changes (keys rotate without a restart). A configured file that cannot be read fails
closed: every request is refused until it is readable again.
"""

from __future__ import annotations

import hmac
import os

from .errors import ApiError

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="diffae"'}


def parse_keys(text: str, separators: str = ",\n") -> frozenset[str]:
    """Keys from text: split on any of ``separators``; blanks and ``#`` comment lines are skipped."""
    for sep in separators[1:]:
        text = text.replace(sep, separators[0])
    return frozenset(k.strip() for k in text.split(separators[0]) if k.strip() and not k.strip().startswith("#"))


class KeyStore:
    """The keys in force; ``check`` raises a 401 ApiError unless the Authorization header carries one."""

    def __init__(self, env_var: str, path: str | None) -> None:
        self.env_keys = parse_keys(os.environ.get(env_var, ""))
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._file_keys: frozenset[str] = frozenset()
        self._file_error: str | None = None

    def keys(self) -> frozenset[str]:
        """The current keys (re-reading the file when its inode, size or mtime changed)."""
        if self.path is None:
            return self.env_keys
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp != self._stamp:
                with open(self.path, encoding="utf-8") as f:
                    self._file_keys = parse_keys(f.read())
                self._stamp, self._file_error = stamp, None
        except (OSError, UnicodeDecodeError) as exc:
            self._stamp, self._file_keys = None, frozenset()
            self._file_error = f"the server's API key file cannot be read ({exc.__class__.__name__})"
        return self.env_keys | self._file_keys

    @property
    def enabled(self) -> bool:
        return bool(self.keys()) or self._file_error is not None

    def check(self, authorization: str | None) -> None:
        keys = self.keys()
        if self._file_error is not None:
            raise ApiError(401, f"{self._file_error}; no key can be verified", CHALLENGE)
        if not keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing API key: send `Authorization: Bearer <key>`", CHALLENGE)
        token_bytes = token.strip().encode()
        # Compare against every key without stopping early, each in constant time.
        match = False
        for key in keys:
            match |= hmac.compare_digest(token_bytes, key.encode())
        if not match:
            raise ApiError(401, "wrong API key", CHALLENGE)
