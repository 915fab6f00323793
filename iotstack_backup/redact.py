"""Secrets out of everything a run prints or logs.

A notify URL carries a password (`https://user:pass@host/`), a token in
its query (`?token=...`) or in its path (healthchecks.io's ping UUID is the
only key to that check); an rclone destination can carry a connection
string (`:sftp,user=pi,pass=...:/path`).  Logs are kept for years and
shared when asking for help, so every URL or destination is shown through
these functions: the secret parts become `***`, the rest stays readable
enough to tell which endpoint it was.  Pure functions of text.
"""
from __future__ import annotations

import re
import urllib.parse

MASK = "***"

# A path segment that looks like a key: long, and made of the characters of
# UUIDs, hex and base64url tokens, with at least one digit.
_TOKEN_SEGMENT = re.compile(r"^(?=.*\d)[A-Za-z0-9_-]{16,}$")

# rclone connection-string options that hold secrets.
_SECRET_OPTION = re.compile(
    r"(?i)^(pass|password|secret|token|key|.*_secret|.*_key|secret_.*|.*password.*|.*token.*)$")


def url(text: str) -> str:
    """text with the password, the query's values and key-like path
    segments masked; text that does not parse as a URL is returned with
    only its user info masked."""
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:
        return re.sub(r"(//[^/@:]*):[^/@]*@", r"\1:%s@" % MASK, text)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        netloc = "%s%s@%s" % (user, ":" + MASK if colon else "", hostport)
    path = "/".join(MASK if _TOKEN_SEGMENT.match(segment) else segment
                    for segment in parts.path.split("/"))
    query = "&".join(_masked_pair(pair) for pair in parts.query.split("&")) if parts.query \
        else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, query, parts.fragment and MASK))


def _masked_pair(pair: str) -> str:
    key, equals, _value = pair.partition("=")
    return key + "=" + MASK if equals else MASK


def rclone_target(target: str) -> str:
    """An rclone REMOTE:PATH or :BACKEND,opt=value:PATH with the values of
    secret options masked."""
    if not target.startswith(":") and "," not in target.partition(":")[0]:
        return target
    head, colon, rest = target.lstrip(":").partition(":")
    options = head.split(",")
    masked = [options[0]] + [_masked_option(option) for option in options[1:]]
    return (":" if target.startswith(":") else "") + ",".join(masked) + colon + rest


def _masked_option(option: str) -> str:
    key, equals, _value = option.partition("=")
    return key + "=" + MASK if equals and _SECRET_OPTION.match(key.strip()) else option


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def text(line: str) -> str:
    """Every URL in a line of text (an error message that quotes one)
    masked."""
    return _URL_IN_TEXT.sub(lambda match: url(match.group(0)), line)
