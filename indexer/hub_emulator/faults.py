"""Fault injection: make chosen requests fail the ways huggingface.co and its CDN really fail.

A rule is (kind, path glob, count): the next `count` requests whose decoded path matches the glob
(fnmatch, e.g. "/api/models*" or "*/model.safetensors") get the fault; count=None means every one.
Rules are tried in the order they were added; the first with budget left fires.

Files behind the CDN redirect are matched by the same path on both hops: the Hub's 302 and the CDN's
answer are both logged and matched as `/{repo}/resolve/{rev}/{file}`. A status or slow fault fires on the
first hop it meets (the Hub's); reset and truncate cut a body, so they skip bodiless answers (the 302)
and fire where the bytes flow (the CDN for LFS files, the Hub for small files).

Kinds:
  429        rate limited: `RateLimit: "api";r=0;t=<retry>` and `Retry-After: <retry>` (the client waits t+1 s)
  500 502 503 504   that status with a JSON error body
  reset      headers and `after` body bytes (default: half), then a TCP reset (SO_LINGER 0)
  truncate   a full Content-Length, `after` body bytes (default: half), then a clean close
  slow       sleep `seconds` before answering normally

CLI spec: KIND:GLOB[:count=N][:retry=S][:seconds=S][:after=BYTES], e.g. "429:/api/models*:count=2".
"""

from __future__ import annotations

import fnmatch
import threading
from dataclasses import dataclass, replace
from typing import Literal, get_args

from errors import BadInputError

FaultKind = Literal["429", "500", "502", "503", "504", "reset", "truncate", "slow"]
KINDS: tuple[str, ...] = get_args(FaultKind)
CUTS = frozenset({"reset", "truncate"})  # the kinds that cut a body short


@dataclass(frozen=True)
class Fault:
    """One injection rule. `remaining` counts down; None fires forever."""

    kind: FaultKind
    path_glob: str = "*"
    remaining: int | None = 1
    retry: int = 1  # 429: seconds in RateLimit t= and Retry-After
    seconds: float = 1.0  # slow: delay before the answer
    after: int | None = None  # reset / truncate: body bytes sent first (None = half the body)
    method: str | None = None  # only this method (GET, HEAD), None = any

    @property
    def status(self) -> int | None:
        return int(self.kind) if self.kind.isdigit() else None


class Faults:
    """The rule list of one emulator; thread-safe."""

    def __init__(self) -> None:
        self._rules: list[Fault] = []
        self._lock = threading.Lock()

    def add(self, kind: str, path_glob: str = "*", count: int | None = 1, *, retry: int = 1,
            seconds: float = 1.0, after: int | None = None, method: str | None = None) -> Fault:
        """Inject `kind` into the next `count` requests (None: all) whose path matches `path_glob`."""
        if kind not in KINDS:
            raise BadInputError(f"fault {kind!r}", f"unknown kind; use one of: {', '.join(KINDS)}")
        if count is not None and count < 1:
            raise BadInputError(f"fault {kind!r}", "count must be at least 1 (or None for every request)")
        verb = method.upper() if method else None
        rule = Fault(kind, path_glob, count, retry, seconds, after, verb)  # type: ignore[arg-type]
        with self._lock:
            self._rules.append(rule)
        return rule

    def take(self, method: str, path: str, *, has_body: bool = True) -> Fault | None:
        """The fault for this request (spending one of its count), or None. `has_body=False` (a redirect)
        leaves reset and truncate rules for the hop that carries the bytes."""
        with self._lock:
            for i, rule in enumerate(self._rules):
                if rule.method not in (None, method) or not fnmatch.fnmatchcase(path, rule.path_glob):
                    continue
                if not has_body and rule.kind in CUTS:
                    continue
                if rule.remaining is not None:
                    left = rule.remaining - 1
                    if left == 0:
                        del self._rules[i]
                    else:
                        self._rules[i] = replace(rule, remaining=left)
                return rule
        return None

    def pending(self) -> list[Fault]:
        with self._lock:
            return list(self._rules)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()


def parse_fault_spec(spec: str) -> dict[str, object]:
    """'KIND:GLOB[:key=value...]' -> keyword arguments for Faults.add."""
    parts = spec.split(":")
    if len(parts) < 2 or not parts[1]:
        raise BadInputError(f"--fault {spec!r}", "expected KIND:GLOB[:count=N][:retry=S][:seconds=S][:after=BYTES]")
    args: dict[str, object] = {"kind": parts[0], "path_glob": parts[1]}
    for option in parts[2:]:
        key, _, value = option.partition("=")
        try:
            if key == "count":
                args["count"] = None if value in ("all", "inf") else int(value)
            elif key in ("retry", "after"):
                args[key] = int(value)
            elif key == "seconds":
                args[key] = float(value)
            elif key == "method":
                args[key] = value
            else:
                raise BadInputError(f"--fault {spec!r}", f"unknown option {key!r}")
        except ValueError:
            raise BadInputError(f"--fault {spec!r}", f"{key}={value!r} is not a number") from None
    return args
