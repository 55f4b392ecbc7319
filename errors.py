"""One hierarchy of errors for the whole tool.

Every error carries the thing it is about (a path, a repo id) and the reason, so that `cli.main()` can
print one line that says what went wrong and what to do. Nothing here may ever include a token.
"""

from __future__ import annotations


class ModelGraphError(Exception):
    """Base of every error the tool raises on purpose (the CLI prints these as one line, exit 1)."""


class BadInputError(ModelGraphError):
    """A path, argument or file the user gave us that we cannot use."""

    def __init__(self, thing: str, reason: str) -> None:
        self.thing = thing
        self.reason = reason
        super().__init__(f"{thing}: {reason}")


class SafetensorsError(BadInputError):
    """A safetensors file (or a sharded index) whose bytes break the format. `thing` is the file name."""


class UnsupportedModelError(BadInputError):
    """A model we refuse to index (no safetensors, pickled weights only, unknown architecture...)."""


class HubError(ModelGraphError):
    """A failure talking to the Hub (or the emulator). `repo_id` may be None for listing calls."""

    def __init__(self, repo_id: str | None, reason: str, *, status: int | None = None) -> None:
        self.repo_id = repo_id
        self.reason = reason
        self.status = status
        where = repo_id or "hub"
        super().__init__(f"{where}: {reason}")


class RepoNotFoundError(HubError):
    """404 with X-Error-Code RepoNotFound (or EntryNotFound for a file)."""


class GatedRepoError(HubError):
    """401/403: the repo is gated or private and our token (if any) does not open it."""


class TransientHubError(HubError):
    """A failure worth retrying: 5xx, a dropped connection, a truncated body (`indexer.retry` retries it;
    if it persists the model is recorded as failed)."""


class RateLimitedError(TransientHubError):
    """429. `retry_after` is the server's reset time in seconds (RateLimit `t=` or Retry-After), if it said."""

    def __init__(self, repo_id: str | None, reason: str, *, status: int | None = 429,
                 retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(repo_id, reason, status=status)


class StoreError(ModelGraphError):
    """The index store on disk cannot be read or written."""


class StoreLockedError(StoreError):
    """Another process holds the store's write lock."""


class FormatVersionError(StoreError):
    """A stored file was written by a newer version of this tool than the one reading it."""


class NoIndexError(StoreError):
    """`home` holds no index yet (missing directory, no FORMAT file, or no models)."""

    def __init__(self, home: str) -> None:
        self.home = home
        super().__init__(f"no index at {home}; run `index crawl` or `index add` first")


class UnknownModelError(BadInputError, StoreError):
    """A repo id the index has never seen. `suggestions` holds near matches, best first."""

    def __init__(self, repo_id: str, suggestions: tuple[str, ...] = ()) -> None:
        self.repo_id = repo_id
        self.suggestions = suggestions
        if suggestions:
            hint = "did you mean " + ", ".join(suggestions) + "?"
        else:
            hint = f"not in the index; run `index add {repo_id}` to index it"
        super().__init__(repo_id, f"unknown model; {hint}")


class RecoveryError(ModelGraphError):
    """Lineage recovery cannot run on the given models."""


class CrawlStopped(ModelGraphError):
    """The stop event was set: the crawl ended after its current model (rows written, cursors not moved)."""


class ClusterError(ModelGraphError):
    """The Dask cluster went away in the middle of a crawl (rows written so far are kept)."""


class GGUFError(BadInputError):
    """A GGUF file whose bytes break the format, or that uses a quantization type we cannot decode.
    `thing` is the file name."""


class QuantizedWeightsError(BadInputError):
    """Packed quantized tensors (GPTQ, AWQ, bitsandbytes, FP8, compressed-tensors) that are inconsistent
    with each other or with `quantization_config`, or in a layout we do not decode. `thing` names the tensor."""


class AdapterError(BadInputError):
    """A PEFT adapter we cannot use: `adapter_config.json` that is not JSON or names no base, or adapter
    tensors that do not pair up. `thing` is the file or tensor name."""
