"""The JSON the Hub returns for a model, built from a repo's files.

Shapes follow huggingface.co as `huggingface_hub.ModelInfo` parses them: `cardData` is the README's
YAML front matter; `baseModels` is {"relation": ..., "models": [{"id": ...}]} from the card's
`base_model`; `safetensors` is {"parameters": {dtype: count}, "total": n} summed over the headers of
every .safetensors file; `config` is the subset of config.json the Hub exposes; `tags` add the
library, model_type, architectures, license and base_model tags to the card's own, so that
`filter=LlamaForCausalLM` or `filter=base_model:org/name` select models as a crawler needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
from dataclasses import dataclass
from typing import Any

import yaml

from indexer.hub_emulator.blobs import Blob, git_blob_sha1, lfs_pointer
from indexer.hub_emulator.repos import Repo

logger = logging.getLogger(__name__)

# Every value `expand=` accepts on the real Hub (huggingface_hub's ExpandModelProperty_T); others -> 400.
EXPAND_FIELDS = frozenset(
    {"author", "baseModels", "cardData", "childrenModelCount", "config", "createdAt", "disabled", "downloads",
     "downloadsAllTime", "evalResults", "gated", "gguf", "inference", "inferenceProviderMapping", "lastModified",
     "library_name", "likes", "mask_token", "model-index", "pipeline_tag", "private", "resourceGroup",
     "safetensors", "sha", "siblings", "spaces", "tags", "transformersInfo", "trendingScore", "usedStorage",
     "widgetData"}
)
# What the Hub sends without `expand`: a listing, a listing with full=True, and model_info.
LIST_FIELDS = ("likes", "trendingScore", "private", "downloads", "tags", "pipeline_tag", "library_name", "createdAt")
FULL_FIELDS = LIST_FIELDS + ("author", "sha", "lastModified", "gated", "disabled", "siblings")
INFO_FIELDS = FULL_FIELDS + ("model-index", "config", "cardData", "spaces", "safetensors", "usedStorage")

# The Hub's pipeline tag from the head class name in config.json `architectures`.
_PIPELINES = (
    ("ForCausalLM", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForImageClassification", "image-classification"),
    ("ForObjectDetection", "object-detection"),
)
_HEADER_LIMIT = 100 * 1024 * 1024  # huggingface_hub refuses bigger safetensors headers too


@dataclass(frozen=True)
class Facts:
    """Everything derived from a repo's small files and safetensors headers (cached by repo sha)."""

    card: dict[str, Any] | None
    config: dict[str, Any] | None
    adapter: dict[str, Any] | None
    parameters: dict[str, int] | None


def front_matter(text: str) -> dict[str, Any] | None:
    """The YAML block between a leading '---' line and the next '---' line; None if absent or broken."""
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for end in range(1, len(lines)):
        if lines[end].strip() == "---":
            try:
                data = yaml.safe_load("\n".join(lines[1:end]))
            except yaml.YAMLError as exc:
                logger.warning("model card front matter is not valid YAML: %s", exc)
                return None
            return data if isinstance(data, dict) else None
    return None


def json_file(blob: Blob | None, limit: int = 16 * 1024 * 1024) -> dict[str, Any] | None:
    if blob is None or blob.size > limit:
        return None
    try:
        data = json.loads(blob.read(0, blob.size))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def safetensors_header(blob: Blob) -> dict[str, Any] | None:
    """The parsed header of a safetensors file, or None if its bytes are not one."""
    if blob.size < 8:
        return None
    (length,) = struct.unpack("<Q", blob.read(0, 8))
    if length > _HEADER_LIMIT or 8 + length > blob.size:
        return None
    try:
        header = json.loads(blob.read(8, length))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return header if isinstance(header, dict) else None


def _count_parameters(repo: Repo) -> dict[str, int] | None:
    counts: dict[str, int] = {}
    found = False
    for path, blob in repo.files.items():
        if not path.endswith(".safetensors"):
            continue
        header = safetensors_header(blob)
        if header is None:
            continue
        found = True
        for name, entry in header.items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            n = 1
            for dim in entry.get("shape", []):
                n *= int(dim)
            counts[str(entry.get("dtype"))] = counts.get(str(entry.get("dtype")), 0) + n
    return dict(sorted(counts.items())) if found else None


_facts_cache: dict[tuple[str, str], Facts] = {}
_facts_lock = threading.Lock()


def facts_of(repo: Repo) -> Facts:
    key = (repo.repo_id, repo.sha)
    with _facts_lock:
        hit = _facts_cache.get(key)
    if hit is not None:
        return hit
    readme = repo.files.get("README.md")
    card = None
    if readme is not None and readme.size < 4 * 1024 * 1024:  # a card, not a data dump
        card = front_matter(readme.read(0, readme.size).decode("utf-8", "replace"))
    facts = Facts(card, json_file(repo.files.get("config.json")), json_file(repo.files.get("adapter_config.json")),
                  _count_parameters(repo))
    with _facts_lock:
        _facts_cache[key] = facts
    return facts


def base_models(repo: Repo, facts: Facts) -> dict[str, Any] | None:
    """{"relation": ..., "models": [{"id": ...}]} from the card's base_model, as the Hub derives it."""
    raw = (facts.card or {}).get("base_model")
    ids = [raw] if isinstance(raw, str) else [m for m in raw if isinstance(m, str)] if isinstance(raw, list) else []
    if not ids:
        return None
    relation = (facts.card or {}).get("base_model_relation")
    if relation not in ("adapter", "merge", "quantized", "finetune"):
        relation = "merge" if len(ids) > 1 else "adapter" if facts.adapter is not None else "finetune"
    return {"relation": relation, "models": [{"id": i} for i in ids]}


def library_name(repo: Repo, facts: Facts) -> str | None:
    declared = (facts.card or {}).get("library_name")
    if isinstance(declared, str):
        return declared
    if facts.adapter is not None:
        return "peft"
    return "transformers" if facts.config is not None else None


def pipeline_tag(facts: Facts) -> str | None:
    declared = (facts.card or {}).get("pipeline_tag")
    if isinstance(declared, str):
        return declared
    for arch in (facts.config or {}).get("architectures") or []:
        for suffix, tag in _PIPELINES:
            if isinstance(arch, str) and arch.endswith(suffix):
                return tag
    return None


def tags(repo: Repo, facts: Facts) -> list[str]:
    card = facts.card or {}
    found: list[str] = []
    card_tags = card.get("tags")
    found += [t for t in (card_tags if isinstance(card_tags, list) else [card_tags]) if isinstance(t, str)]
    lib = library_name(repo, facts)
    found += [lib] if lib else []
    found += ["safetensors"] if any(p.endswith(".safetensors") for p in repo.files) else []
    found += ["gguf"] if any(p.endswith(".gguf") for p in repo.files) else []  # the Hub tags GGUF repos so
    config = facts.config or {}
    found += [config["model_type"]] if isinstance(config.get("model_type"), str) else []
    found += [a for a in config.get("architectures") or [] if isinstance(a, str)]
    pipe = pipeline_tag(facts)
    found += [pipe] if pipe else []
    lic = card.get("license")
    found += [f"license:{lic}"] if isinstance(lic, str) else []
    bases = base_models(repo, facts)
    for model in (bases or {}).get("models", []):
        found += [f"base_model:{model['id']}", f"base_model:{bases['relation']}:{model['id']}"]  # type: ignore[index]
    found.append("region:us")
    return list(dict.fromkeys(found))  # de-duplicated, first occurrence order like the Hub


def hub_config(facts: Facts) -> dict[str, Any] | None:
    """The part of config.json the Hub exposes (plus `peft` for adapter repos, as the Hub does)."""
    out: dict[str, Any] = {}
    for key in ("architectures", "model_type", "quantization_config"):
        if facts.config is not None and key in facts.config:
            out[key] = facts.config[key]
    if facts.adapter is not None:
        out["peft"] = {k: facts.adapter.get(k) for k in ("base_model_name_or_path", "task_type")}
    return out or None


def sibling(path: str, blob: Blob, *, blobs: bool) -> dict[str, Any]:
    if not blobs:
        return {"rfilename": path}
    entry: dict[str, Any] = {"rfilename": path, "size": blob.size}
    if blob.lfs:
        pointer = lfs_pointer(blob)
        entry["blobId"] = git_blob_sha1(pointer)
        entry["lfs"] = {"size": blob.size, "sha256": blob.sha256(), "pointerSize": len(pointer)}
    else:
        entry["blobId"] = blob.git_sha1()
    return entry


def _field(name: str, repo: Repo, facts: Facts, *, blobs: bool) -> tuple[bool, Any]:
    """(present, value) of one field; absent fields are left out of the JSON as the Hub does."""
    meta = repo.meta
    simple: dict[str, Any] = {
        "author": repo.author, "sha": repo.sha, "createdAt": repo.created_at, "lastModified": repo.last_modified,
        "private": meta.private, "gated": meta.gated, "disabled": False, "downloads": meta.downloads,
        "downloadsAllTime": meta.downloads, "likes": meta.likes, "trendingScore": 0, "spaces": [],
        "usedStorage": sum(b.size for b in repo.files.values()), "childrenModelCount": 0,
    }
    if name in simple:
        return True, simple[name]
    computed: dict[str, Any] = {
        "library_name": lambda: library_name(repo, facts),
        "pipeline_tag": lambda: pipeline_tag(facts),
        "tags": lambda: tags(repo, facts),
        "config": lambda: hub_config(facts),
        "cardData": lambda: facts.card,
        "baseModels": lambda: base_models(repo, facts),
        "model-index": lambda: (facts.card or {}).get("model-index"),
        "siblings": lambda: [sibling(p, b, blobs=blobs) for p, b in repo.files.items()],
        "safetensors": lambda: (
            {"parameters": facts.parameters, "total": sum(facts.parameters.values())} if facts.parameters else None
        ),
    }
    if name not in computed:
        return False, None  # a real field we cannot compute (gguf, inference, ...): the Hub omits it too
    value = computed[name]()
    return value is not None, value


def model_json(repo: Repo, fields: tuple[str, ...] | list[str], *, blobs: bool = False) -> dict[str, Any]:
    """One model as the Hub returns it: `_id` and `id` always, then the requested fields."""
    facts = facts_of(repo)
    out: dict[str, Any] = {"_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id}
    for name in fields:
        present, value = _field(name, repo, facts, blobs=blobs)
        if present:
            out[name] = value
    out["modelId"] = repo.repo_id
    return out


def matches(repo: Repo, *, search: str | None, author: str | None, filters: list[str],
            gated: bool | None = None) -> bool:
    """The listing filters the Hub applies: search in the id, exact author, every filter among the tags."""
    if search and search.lower() not in repo.repo_id.lower():
        return False
    if author and author.lower() != repo.author.lower():
        return False
    if gated is not None and bool(repo.meta.gated) != gated:
        return False
    if filters:
        have = {t.lower() for t in tags(repo, facts_of(repo))}
        if not all(f.lower() in have for f in filters):
            return False
    return True
