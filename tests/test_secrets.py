"""Redaction: every secret a URL can carry is masked, in free text too, and everything else stays as it was."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cifar_transfer.errors import ConfigError
from cifar_transfer.redact import SECRET_PARAMETERS, redact, refuse_secrets, secrets_in


@pytest.mark.parametrize(
    "text, redacted, kinds",
    [
        ("https://user:pw@host/x", "https://***@host/x", ["credentials in the URL"]),
        ("https://ghp_TOKEN@github.com/o/r", "https://***@github.com/o/r", ["credentials in the URL"]),
        ("https://user:p@ss@host:8443/x", "https://***@host:8443/x", ["credentials in the URL"]),
        ("https://user:pa::ss@host/x", "https://***@host/x", ["credentials in the URL"]),
        ("'https://user:pw@host' is gone", "'https://***@host' is gone", ["credentials in the URL"]),
        ("http://user:pw@[::1]:8080/x?sig=abc", "http://***@[::1]:8080/x?sig=***", ["credentials in the URL", "query parameter sig"]),
        ("simplecache::https://user:pw@host/x", "simplecache::https://***@host/x", ["credentials in the URL"]),
        ("filecache::s3://key:secret@bucket/x", "filecache::s3://***@bucket/x", ["credentials in the URL"]),
        ("zip://member::s3://key:secret@bucket/a.zip", "zip://member::s3://***@bucket/a.zip", ["credentials in the URL"]),
        ("tcp://user:pw@10.0.0.5:8786", "tcp://***@10.0.0.5:8786", ["credentials in the URL"]),
        (
            "https://b.s3.amazonaws.com/c.tar.gz?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAX%2F20240101&X-Amz-Date=20240101T000000Z"
            "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=TOK&X-Amz-Signature=abcdef",
            "https://b.s3.amazonaws.com/c.tar.gz?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Date=20240101T000000Z"
            "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=***&X-Amz-Signature=***",
            ["query parameter X-Amz-Credential", "query parameter X-Amz-Security-Token", "query parameter X-Amz-Signature"],
        ),
        (
            "https://b.s3.amazonaws.com/c?AWSAccessKeyId=AKIAX&Expires=1700000000&Signature=vjbyP%2Bab%3D",
            "https://b.s3.amazonaws.com/c?AWSAccessKeyId=***&Expires=1700000000&Signature=***",
            ["query parameter AWSAccessKeyId", "query parameter Signature"],
        ),
        (
            "https://acct.blob.core.windows.net/c/cifar.tar.gz?sv=2022-11-02&se=2024-01-01&sp=r&sig=AbC%2Bd%3D",
            "https://acct.blob.core.windows.net/c/cifar.tar.gz?sv=2022-11-02&se=2024-01-01&sp=r&sig=***",
            ["query parameter sig"],
        ),
        (
            "https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=sa%40p.iam&X-Goog-Signature=0a1b",
            "https://storage.googleapis.com/b/o?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=***&X-Goog-Signature=***",
            ["query parameter X-Goog-Credential", "query parameter X-Goog-Signature"],
        ),
        ("https://h/x?x-amz-signature=abc", "https://h/x?x-amz-signature=***", ["query parameter x-amz-signature"]),
        ("https://h/x?X%2DAmz%2DSignature=abc", "https://h/x?X%2DAmz%2DSignature=***", ["query parameter X-Amz-Signature"]),
        (
            "https://api.h/x?api_key=K1&apikey=K2&key=K3&token=T&access_token=A&password=P&secret=S&client_secret=C&page=2",
            "https://api.h/x?api_key=***&apikey=***&key=***&token=***&access_token=***&password=***&secret=***&client_secret=***&page=2",
            [
                "query parameter api_key",
                "query parameter apikey",
                "query parameter key",
                "query parameter token",
                "query parameter access_token",
                "query parameter password",
                "query parameter secret",
                "query parameter client_secret",
            ],
        ),
        ("https://h/x?sig=abc#part-2", "https://h/x?sig=***#part-2", ["query parameter sig"]),
        ("https://h/cb#access_token=abc&state=s1", "https://h/cb#access_token=***&state=s1", ["query parameter access_token"]),
        ("https://h/x?key=&page=2", "https://h/x?key=&page=2", []),
    ],
)
def test_secrets_are_masked_and_named(text, redacted, kinds):
    assert redact(text) == redacted
    assert secrets_in(text) == kinds


@pytest.mark.parametrize(
    "text",
    [
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "https://h/x?Expires=1700000000&sv=2022-11-02&se=2024-01-01&sp=r&page=2#frag",
        "s3://bucket/prefix/cifar.tar.gz",
        "simplecache::https://host/x.tar.gz",
        "/data/cifar-10-python.tar.gz",
        "C:\\data\\cifar.tar.gz",
        "tcp://10.0.0.5:8786",
        "ray://10.0.0.5:10001",
        "http://[::1]:8080/x",
        "user@example.com wrote: see https://h/x?q=1 (a:b@c is not a URL)",
        "",
    ],
)
def test_text_without_secrets_is_unchanged(text):
    assert redact(text) == text
    assert secrets_in(text) == []


def test_free_text_with_several_urls_keeps_the_prose():
    text = (
        "GET 'https://h/a?X-Amz-Signature=S1&X-Amz-Expires=60' failed: 403\n"
        "retrying with simplecache::s3://AKIA:S2@bucket/b, then https://plain/c?sig=S3."
    )
    assert redact(text) == (
        "GET 'https://h/a?X-Amz-Signature=***&X-Amz-Expires=60' failed: 403\n"
        "retrying with simplecache::s3://***@bucket/b, then https://plain/c?sig=***"
    )
    assert secrets_in(text) == ["query parameter X-Amz-Signature", "credentials in the URL", "query parameter sig"]


def test_secrets_in_never_returns_a_secret():
    kinds = secrets_in("https://USERX:PASSX@h/x?X-Amz-Signature=SIGX&token=TOKX")
    assert not any(secret in kind for kind in kinds for secret in ("USERX", "PASSX", "SIGX", "TOKX"))


# What may stand unencoded in userinfo (RFC 3986: unreserved, sub-delims, ":" and "%"; a raw "@" too, which
# clients split at the last one) and in a query value (also "/", "?", "+", "=" of base64 signatures).
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_USERINFO = st.text(_ALNUM + "-._~!$&'()*+,;=%@", min_size=1, max_size=30)
_PASSWORD = st.text(_ALNUM + "-._~!$&'()*+,;=%:@", min_size=1, max_size=30)
_SIGNATURE = st.text(_ALNUM + "-._~%/?+=:@", min_size=1, max_size=60)
_PROSE = st.text(_ALNUM + " .,:;()[]{}\n\t", max_size=20).map(lambda prose: f" {prose} ")
_NAME = st.builds(
    lambda name, case: case(name), st.sampled_from(sorted(SECRET_PARAMETERS)), st.sampled_from([str.lower, str.upper, str.title])
)


@given(
    user=_USERINFO,
    password=_PASSWORD,
    signature=_SIGNATURE,
    name=_NAME,
    before=_PROSE,
    after=_PROSE,
    chain=st.sampled_from(["", "simplecache::", "filecache::", "zip://member::"]),
)
def test_random_secrets_never_survive(user, password, signature, name, before, after, chain):
    clean = f"{chain}https://{{}}host.example:8443/a/cifar.tar.gz?Expires=60&{name}={{}}&page=2#top"
    text = before + clean.format(f"{user}:{password}@", signature) + after
    assert redact(text) == before + clean.format("***@", "***") + after
    assert len(secrets_in(text)) == 2


# Passwords as people paste them: reserved characters unencoded ("#", "?", "/", "[", "]", "@", ":") or
# percent-encoded. Two forms read as a host and a path and must be percent-encoded (the README says so): digits
# then "/" ("user:8443/x@host"), and "@", a name, "/" ("user:a@b/c@host"); so passwords start with a letter here,
# and one holding "@" holds no "/".
_RAW_PASSWORD = st.builds(
    lambda first, rest: first + rest, st.sampled_from(_ALNUM[:52]), st.text(_ALNUM + "-._~!$&'()*+,;=%:@#?/[]", max_size=30)
).filter(lambda text: not ("@" in text and "/" in text))
_PLAIN_USER = st.text(_ALNUM + "-._~!$&'()*+,;=%", min_size=1, max_size=20)


@given(
    user=_PLAIN_USER,
    password=_RAW_PASSWORD,
    scheme=st.sampled_from(["https", "s3", "gcs", "tcp", "ray"]),
    path=st.sampled_from(["/a/cifar.tar.gz", "/b/", ""]),
    query=st.sampled_from(["", "?page=2", "?e=a@b.c"]),
    chain=st.sampled_from(["", "simplecache::", "zip://member::"]),
)
def test_credentials_with_unencoded_reserved_characters_are_found_and_masked(user, password, scheme, path, query, chain):
    text = f"{chain}{scheme}://{user}:{password}@host.example:8443{path}{query}"
    redacted = redact(text)
    assert redacted == f"{chain}{scheme}://***@host.example:8443{path}{query}" or not path and "@" in query
    assert secrets_in(text)[:1] == ["credentials in the URL"]
    assert f"{user}:{password}" not in redacted


@pytest.mark.parametrize(
    "text",
    [
        "https://host.example:8443/a?e=a@b.c",
        "https://host.example/a@b.png",
        "http://[::1]:8080/x?e=a@b",
        "https://host?e=a@b",
        "https://host:8080?e=a@b",
        "https://host:8080/p/q@r",
    ],
)
def test_an_at_sign_after_the_host_is_not_taken_for_credentials(text):
    assert redact(text) == text and secrets_in(text) == []


@pytest.mark.parametrize(
    "value",
    [
        "https://user:pass word@example.com/c.tar.gz",
        "s3://bucket/c.tar.gz?aws_secret_access_key=x",
        "gs://b/c?private_key=x",
        "https://h/c.tar.gz#sas_token=x",
        "s3://bucket/x?AWS_SESSION_TOKEN=x",
    ],
)
def test_an_option_value_is_one_url_whatever_it_holds(value):
    with pytest.raises(ConfigError, match="--source embeds credentials"):
        refuse_secrets("--source", value)
