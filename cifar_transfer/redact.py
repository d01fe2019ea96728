"""Secrets never leave the process: URLs and addresses are redacted before they reach logs, records or artifacts.

A URL carries secrets in two places: its userinfo (`https://user:password@host`, `s3://key:secret@bucket`)
and its query string or fragment (presigned S3/GCS URLs, Azure SAS tokens, `?api_key=`). Both are found in
free text (a log line, an error message), in every link of a chained fsspec URL
(`simplecache::s3://key:secret@bucket/x`), and replaced by `***`; the rest stays readable.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from cifar_transfer.errors import ConfigError

MASK = "***"

# Query (or fragment) parameters whose value is a secret or a credential, lower case. Expires, se, sp, sv
# and other signing metadata are kept: they help reading a failure and prove nothing.
SECRET_PARAMETERS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "awsaccesskeyid",
        "signature",
        "x-goog-signature",
        "x-goog-credential",
        "googleaccessid",
        "sig",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "auth_token",
        "authorization",
        "api_key",
        "apikey",
        "key",
        "password",
        "passwd",
        "pwd",
        "secret",
        "client_secret",
        "private_key",
        "access_key",
        "secret_key",
        "secret_access_key",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "session_token",
        "credential",
        "credentials",
        "sas",
        "sas_token",
    }
)

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


def refuse_secrets(option: str, value: str | None) -> None:
    """The one check of every option that takes a URL or a path: `ConfigError` when `value` embeds credentials
    (naming their kind, never them), since options end up in logs, records and Prefect's database."""
    found = secrets_in(re.sub(r"\s", "%20", value)) if value else []  # an option is one URL, spaces in a password too
    if found:
        raise ConfigError(
            f"{option} embeds credentials ({', '.join(found)}): remove them and let fsspec/httpx read them from the environment "
            "or your profile (AWS_PROFILE, AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ~/.netrc; see the README's "
            "'Credentials'); for a signed URL, download the file first (curl -o FILE '<your URL>') and pass its local path"
        )


def _scan(link: str) -> tuple[str, list[str]]:
    """One link redacted, and the kinds of secret it held."""
    scheme, _, rest = link.partition("://")
    kinds = []
    userinfo_end = _userinfo_end(rest)
    if userinfo_end >= 0:
        kinds.append("credentials in the URL")
        rest = rest[userinfo_end + 1 :]
    authority_end = _first(rest, "/?#")
    authority, rest = (MASK + "@" if userinfo_end >= 0 else "") + rest[:authority_end], rest[authority_end:]
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


def _userinfo_end(rest: str) -> int:
    """Where the userinfo of a link (after its "://") ends: the index of its "@", or -1 when it has none.

    RFC 3986 puts userinfo before the first "/", "?" or "#", ending at the last "@" there. People also paste
    passwords with those characters unencoded ("user:pa#ss@host"), so a first "@" after one of them ends the userinfo
    too when what precedes it reads as "user:password" and not as "host:port/path" or "[IPv6]"; and a password
    holding both "@" and such a character ends at a later "@" unless what lies between reads as a host and a path.
    Still ambiguous, and read as a host: a password of digits then "/" ("user:123/x@host"), or with "@" then a
    name and "/" ("user:a@b/c@host"); such passwords must be percent-encoded.
    """
    ats = [index for index, character in enumerate(rest) if character == "@"]
    if not ats:
        return -1
    delimiter = _first(rest, "/?#")
    end = max((at for at in ats if at < delimiter), default=-1)
    if end < 0:
        user, colon, password = rest[: ats[0]].partition(":")
        if not colon or not user or any(character in user for character in "/?#[]") or _PORT_THEN_PATH.match(password):
            return -1
        end = ats[0]
    for at in ats:
        if at > end and not _HOST_THEN_PATH.match(rest[end + 1 : at]):
            end = at
    return end


_PORT_THEN_PATH = re.compile(r"\d*(?:[/?#]|$)")
_HOST_THEN_PATH = re.compile(r"(?:\[[^\]/]*\]|[^/?#\[\]@]+)[^/?#]*/")


def _first(text: str, characters: str) -> int:
    """Index of the first of `characters` in `text`, or its length."""
    return next((index for index, character in enumerate(text) if character in characters), len(text))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` redacted and safe for a terminal: control characters (an `ESC[2J` in a file name, a newline that would
    forge a second line) are shown as `\\x1b`-style escapes instead of acting."""
    return _CONTROL.sub(lambda control: f"\\x{ord(control.group()):02x}", redact(text))
