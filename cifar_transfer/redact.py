"""Secrets never leave the process: URLs and addresses are redacted before they reach logs, records or artifacts.

A URL carries secrets in two places: its userinfo (`https://user:password@host`, `s3://key:secret@bucket`)
and its query string or fragment (presigned S3/GCS URLs, Azure SAS tokens, `?api_key=`). Both are found in
free text (a log line, an error message), in every link of a chained fsspec URL
(`simplecache::s3://key:secret@bucket/x`), and replaced by `***`; the rest stays readable.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

MASK = "***"

# Query (or fragment) parameters whose value is a secret or a credential, lower case. Expires, se, sp, sv
# and other signing metadata are kept: they help reading a failure and prove nothing.
SECRET_PARAMETERS = frozenset({
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "awsaccesskeyid", "signature",
    "x-goog-signature", "x-goog-credential", "googleaccessid", "sig",
    "token", "access_token", "refresh_token", "id_token", "auth_token", "authorization",
    "api_key", "apikey", "key", "password", "passwd", "secret", "client_secret",
})

# One link of a URL: scheme, "://", then everything up to whitespace, a character no URL holds (" < > `) or
# the "::" that chains the next link of an fsspec URL (`zip://member::s3://bucket/a.zip`); any other "::"
# (an IPv6 host, a password) stays in the link. A single quote may be part of a password, so it stays in the
# link too: a closing quote right after a secret is masked with it.
_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
_LINK = re.compile(rf"{_SCHEME}(?:(?!::{_SCHEME})[^\s\"<>`])*")
_PARAMETER = re.compile(r"(?P<lead>[?&#;])(?P<name>[^=&#;?]+)=(?P<value>[^&#;]*)")


def redact(text: str) -> str:
    """`text` with the userinfo and secret query parameters of every URL in it replaced by `***`."""
    return _LINK.sub(lambda link: _scan(link.group())[0], text)


def secrets_in(url: str) -> list[str]:
    """The kinds of secret in `url` (or any text), e.g. "query parameter X-Amz-Signature", never the secrets."""
    kinds: list[str] = []
    for link in _LINK.finditer(url):
        kinds += [kind for kind in _scan(link.group())[1] if kind not in kinds]
    return kinds


def _scan(link: str) -> tuple[str, list[str]]:
    """One link redacted, and the kinds of secret it held."""
    scheme, _, rest = link.partition("://")
    authority_end = _first(rest, "/?#")
    authority, rest = rest[:authority_end], rest[authority_end:]
    kinds = []
    userinfo, at, host = authority.rpartition("@")
    if userinfo:
        kinds.append("credentials in the URL")
        authority = MASK + at + host
    query_start = _first(rest, "?#")
    path, query = rest[:query_start], rest[query_start:]

    def mask(parameter: re.Match) -> str:
        name = unquote(parameter["name"])
        if name.lower() not in SECRET_PARAMETERS or not parameter["value"]:
            return parameter.group()
        kinds.append(f"query parameter {name}")
        return f"{parameter['lead']}{parameter['name']}={MASK}"

    query = _PARAMETER.sub(mask, query)
    return f"{scheme}://{authority}{path}{query}", kinds


def _first(text: str, characters: str) -> int:
    """Index of the first of `characters` in `text`, or its length."""
    return next((index for index, character in enumerate(text) if character in characters), len(text))
