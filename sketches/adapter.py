"""PEFT adapters (LoRA, DoRA, AdaLoRA, LoHa, LoKr) and LoRA / LyCORIS files: their config, their updates as
low-rank factors, and distances between updates.

Repo layout (PEFT `save_pretrained`):

    adapter_config.json        {"peft_type": "LORA", "base_model_name_or_path", "r", "lora_alpha",
                                "target_modules", "modules_to_save", "use_rslora", "fan_in_fan_out",
                                "rank_pattern", "alpha_pattern", "use_dora", ...}
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight  (r, in)      [".default" in old saves]
                               base_model.model.<module>.lora_B.weight  (out, r)
                               base_model.model.<module>.lora_embedding_A / _B      (r, vocab) / (dim, r)
                               base_model.model.<module>.lora_magnitude_vector      (out,) DoRA only
                               base_model.model.<module>.weight / .bias             a modules_to_save copy

The update of `<module>.weight` is s * B @ A with s = alpha / r (use_rslora: alpha / sqrt(r)); r and
alpha per module from rank_pattern / alpha_pattern (a pattern matches a module path ending in it, as
PEFT's `get_pattern_key`). It is stored transposed, (B @ A).T, for fan_in_fan_out layers (GPT-2's
Conv1D) and embeddings; conv LoRA is B (out, r, 1, 1) after A (r, in, kh, kw), a product over r too.

DoRA (use_dora) writes each updated weight as m * (W + s B A) / ||W + s B A|| by output row: a magnitude m
per row, which PEFT starts at the base's row norms ||W_i||, over the direction of the LoRA-updated weight.
Its s B A is what changes the direction, and it is the update the distances below use (two DoRA runs of
one base both start at m = ||W_i||, so m tells a continued run no better than B A does). m itself is a
fingerprint of the base (`magnitude_fit`): it follows the base's row norms up to what training moved it,
which no unrelated model's rows do.

LoRA files without an adapter_config.json (`loose_layout`), the Hub's Stable Diffusion / Flux LoRAs:
    diffusers   unet.<module>.lora.down.weight / .lora.up.weight (its older saves), or
                unet.<module>.lora_A.weight / .lora_B.weight (transformer.<module> for DiT pipelines)
    kohya       lora_unet_<module with _ for .>.lora_down.weight / .lora_up.weight / .alpha (a 0-d tensor)
down is A, up is B; a module's `.alpha` tensor sets s = alpha / r (kohya's and diffusers' network_alphas),
else s = 1. Their base is named only by the model card (`base_model`). Text-encoder updates (text_encoder.,
lora_te*_) are left out: the base's text encoder is never read, only its denoiser. kohya's SDXL files name
the UNet's original LDM modules (lora_unet_input_blocks_4_1_...): resolved through `sketches.ldm`; kohya's FLUX
files the original FLUX modules (lora_unet_double_blocks_0_img_attn_qkv): renamed, and fused q/k/v split by rows,
by `sketches.flux.flux_updates`. LyCORIS files name
LoHa / LoKr factors as kohya names LoRA's (lora_unet_<module>.hada_w1_a, .lokr_w1, ...); their Tucker
cores (conv), OFT / BOFT and kohya's DoRA scale are refused by name.

The other low-rank kinds are written as factors s * B @ A too, so that every distance below holds for them
(`lora_updates`; each checked against PEFT's merge_and_unload in tests/test_adapter.py):
    AdaLoRA     B diag(E) A (lora_E: its singular values), s = lora_alpha / r
    LoHa        (W1a W1b) * (W2a W2b) elementwise = (W1a . W2a)(W1b * W2b), `.` and `*` the row- and
                column-wise Kronecker products: rank r1 r2
    LoKr        kron(W1, W2) = kron(U1, U2) kron(V1, V2), each W whole (U = W, V = I) or U V

Distances never form B @ A (out x in): with r1, r2 << out, in every quantity is an r x r product.
    ||s1 B1 A1 - s2 B2 A2||_F^2 = s1^2 <B1'B1, A1A1'> + s2^2 <B2'B2, A2A2'> - 2 s1 s2 <B1'B2, A1A2'>
    (<X, Y> = sum of X * Y: the Gram matrices are r x r), and the singular values of the difference
    come from QR factors of the stacked factors: [s1 B1, -s2 B2] = Qb Rb, [A1; A2]' = Qa Ra, so
    D = Qb (Rb Ra') Qa' has the singular values of the (r1 + r2) square matrix Rb Ra'.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from errors import AdapterError
from sketches.flux import flux_updates
from sketches.layers import is_vocabulary, normalise_name
from sketches.ldm import ldm_names

__all__ = [
    "AdapterConfig",
    "Compatibility",
    "LoraUpdate",
    "check_compatibility",
    "exchangeable_rows",
    "magnitude_fit",
    "difference_singular_values",
    "MagnitudeFit",
    "lora_alphas",
    "lora_magnitudes",
    "Factors",
    "factor_sets",
    "local_path",
    "loose_layout",
    "lora_updates",
    "parse_adapter_config",
    "saved_modules",
    "tail_norm",
    "update_distance",
    "update_distances",
    "update_norm",
]

logger = logging.getLogger(__name__)

MAX_CONFIG_BYTES = 1024 * 1024  # real adapter_config.json files are ~1 KB
PEFT_TYPES = ("LORA", "ADALORA", "LOHA", "LOKR")  # the updates `lora_updates` can write as s * B @ A
# Any other PEFT type (IA3's scaling vectors, prompt / prefix tuning's virtual tokens, VeRA, OFT, ...) is
# placed under the base it declares and nothing more: no update is read from it (`has_factors`).
PREFIX = "base_model.model."
# A factor tensor: <module>.<role>[.<adapter name>][.weight]. Roles: LoRA's A / B (PEFT's lora_A / lora_B,
# lora_embedding_A / _B, AdaLoRA's lora_E; diffusers' lora.down / lora.up; kohya's lora_down / lora_up),
# LoHa's four Hadamard factors, LoKr's two Kronecker factors, each whole or as a low-rank product.
_ROLES = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "A", "lora_embedding_B": "B", "lora_E": "E",
          "lora_down": "A", "lora_up": "B", "lora.down": "A", "lora.up": "B",
          "hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b",
          "lokr_w1": "k1", "lokr_w1_a": "k1a", "lokr_w1_b": "k1b", "lokr_w2": "k2", "lokr_w2_a": "k2a", "lokr_w2_b": "k2b"}
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<role>" + "|".join(re.escape(r) for r in sorted(_ROLES, key=len, reverse=True))
                     + r")(?:\.(?!bias$)(?P<adapter>[^.]+))?(?:\.weight)?$")  # PEFT's lora_bias is no factor
_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")
_DENOISER = ("unet.", "transformer.", "lora_unet_", "lora_transformer_")
_TEXT_ENCODER = ("text_encoder.", "text_encoder_2.", "text_encoder_3.", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
# what no update here is made of: LoHa / LoKr Tucker cores (conv), OFT / BOFT rotations, kohya's DoRA scale
_UNREAD = re.compile(r"\.(?:hada_t[12]|lokr_t2|oft_blocks|oft_diag|oft_r|boft_R|boft_s|dora_scale)(?:\.[^.]+)?$")
# <module>.lora_magnitude_vector (PEFT >= 0.12 strips `.default.weight`; older saves kept `.default`)
_MAGNITUDE = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")


# --- config -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterConfig:
    base_model: str
    peft_type: str
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str  # a list of names, or one regular expression (PEFT allows both)
    modules_to_save: tuple[str, ...] = ()
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    use_dora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()  # (pattern, r) in file order: the first match wins
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    layout: str = "peft"  # "peft" (adapter_config.json), or a LoRA file without one: "diffusers", "kohya"

    def rank_for(self, module: str) -> int:
        return int(_pattern_value(self.rank_pattern, module, self.r))

    def alpha_for(self, module: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module, self.lora_alpha))

    def scale_for(self, module: str) -> float:
        """s of the update of `module` (a module path without the `base_model.model.` prefix)."""
        r, alpha = self.rank_for(module), self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_value(patterns: tuple[tuple[str, Any], ...], module: str, default: Any) -> Any:
    for pattern, value in patterns:
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        except re.error:
            continue  # PEFT would have refused it at training time; a broken pattern matches nothing
    return default


def _load(raw: bytes, name: str) -> dict[str, Any]:
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterError(name, f"{len(raw)} bytes, over the {MAX_CONFIG_BYTES}-byte cap for an adapter config")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AdapterError(name, f"not UTF-8 (byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        raise AdapterError(name, f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise AdapterError(name, f"a JSON {type(obj).__name__}, not an object")
    return obj


def _positive(name: str, obj: Mapping[str, Any], key: str, default: float | None, *, whole: bool) -> float:
    value = obj.get(key, default)
    ok = type(value) is int if whole else type(value) in (int, float)
    if not ok or value <= 0 or (not whole and not math.isfinite(value)):
        kind = "a positive whole number" if whole else "a positive number"
        raise AdapterError(name, f"{key} must be {kind}, got {value!r:.40}")
    return value


def _strings(name: str, obj: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = obj.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AdapterError(name, f"{key} must be a list of module names, got {value!r:.60}")
    return tuple(value)


def _patterns(name: str, obj: Mapping[str, Any], key: str, *, whole: bool) -> tuple[tuple[str, Any], ...]:
    value = obj.get(key) or {}
    if not isinstance(value, dict):
        raise AdapterError(name, f"{key} must be an object of pattern -> number, got {value!r:.60}")
    return tuple((str(k), _positive(name, value, k, None, whole=whole)) for k in value)


def parse_adapter_config(raw: bytes, *, name: str = "adapter_config.json", card_base: str = "") -> AdapterConfig:
    """Validate the bytes of adapter_config.json. Pure; every failure is an AdapterError naming `name`.

    Refused: not JSON, no base model (`base_model_name_or_path` missing or empty, and `card_base`, the
    repo card's `base_model`, empty too: the adapter cannot be placed; the card's also stands in for a
    path on the trainer's disk), a non-LoRA PEFT type (LoHa, IA3, prompt tuning: no B @ A update), bad r or alpha.
    """
    obj = _load(raw, name)
    base = obj.get("base_model_name_or_path")
    card = card_base.split(";")[0].strip()
    if (not isinstance(base, str) or not base.strip()) and card:
        base = card  # PEFT writes null for a base built from a config; the repo's card may still name it
    elif isinstance(base, str) and card and local_path(base):
        base = card  # a path on the trainer's disk names nothing here; the card names the Hub repo
    if not isinstance(base, str) or not base.strip():
        raise AdapterError(name, "names no base model (base_model_name_or_path is missing or empty, and no "
                                 "base_model in the model card)")
    peft_type = str(obj.get("peft_type", "LORA")).upper()
    if peft_type not in PEFT_TYPES and not re.fullmatch(r"[A-Z][A-Z0-9_]{1,40}", peft_type):
        raise AdapterError(name, f"peft_type {peft_type!r} is not a PEFT type name")
    targets = obj.get("target_modules") or []
    target_modules = targets if isinstance(targets, str) else _strings(name, obj, "target_modules")
    alpha_key = "alpha" if peft_type in ("LOHA", "LOKR") else "lora_alpha"
    if peft_type == "ADALORA":  # its rank_pattern is a mask per module; the saved factors have the ranks
        obj = {k: v for k, v in obj.items() if k != "rank_pattern"}
    return AdapterConfig(
        base_model=base.strip(),
        peft_type=peft_type,
        r=int(_positive(name, obj, "r", 8, whole=True)),
        lora_alpha=float(_positive(name, obj, alpha_key, 8, whole=False)),
        target_modules=target_modules,
        modules_to_save=_strings(name, obj, "modules_to_save"),
        use_rslora=bool(obj.get("use_rslora", False)),
        fan_in_fan_out=bool(obj.get("fan_in_fan_out", False)),
        use_dora=bool(obj.get("use_dora", False)),
        rank_pattern=_patterns(name, obj, "rank_pattern", whole=True),
        alpha_pattern=_patterns(name, obj, "alpha_pattern", whole=False),
    )


def local_path(name: str) -> bool:
    """A filesystem path rather than a Hub repo id (`org/name`)."""
    name = name.strip()
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or re.match(r"^[A-Za-z]:", name) is not None


# --- tensors ----------------------------------------------------------------------------------------


def _strip(name: str) -> str:
    return name.removeprefix(PREFIX)


@dataclass(frozen=True)
class Factors:
    """The factor tensors of one updated weight: role -> tensor name (`_ROLES`)."""

    kind: str  # "lora" (A, B; AdaLoRA's E too), "loha", "lokr"
    parts: Mapping[str, str]
    embedding: bool = False  # PEFT's lora_embedding_A / _B: the update is stored transposed

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.parts.values()))


_NEEDED = {"lora": ({"A", "B"},), "loha": ({"w1a", "w1b", "w2a", "w2b"},),
           "lokr": ({"k1", "k2"}, {"k1", "k2a", "k2b"}, {"k1a", "k1b", "k2"}, {"k1a", "k1b", "k2a", "k2b"})}


def factor_sets(names: Iterable[str], layout: str = "peft") -> dict[str, Factors]:
    """Base weight name -> its factors, sorted; an incomplete set (an A without its B, three of LoHa's
    four) raises naming a tensor. `layout`: the config's (a LoRA file without a config: `loose_layout`)."""
    roles: dict[str, dict[str, str]] = {}
    for name in sorted(names):
        found = _factor(name, layout)
        if found is not None:
            roles.setdefault(found[0], {})[found[1]] = name
    sets = {}
    for weight, parts in sorted(roles.items()):
        kind = "loha" if "w1a" in parts or "w2a" in parts or "w1b" in parts or "w2b" in parts else (
            "lokr" if any(r.startswith("k") for r in parts) else "lora")
        usable = set(parts) - {"E"}
        if not any(usable == need for need in _NEEDED[kind]):
            raise AdapterError(next(iter(parts.values())), f"an incomplete {kind} factor set ({', '.join(sorted(parts))})")
        sets[weight] = Factors(kind, dict(parts), any("lora_embedding_" in n for n in parts.values()))
    return sets


def _factor(name: str, layout: str) -> tuple[str, str] | None:
    """(base weight, role) of a factor tensor's name, or None (not a factor; a text-encoder one)."""
    m = _FACTOR.match(name)
    if m is None:
        return None
    module = _strip(m.group("module")) if layout == "peft" else _denoiser_module(m.group("module"))
    return (module + ".weight", _ROLES[m.group("role")]) if module is not None else None


def _denoiser_module(module: str) -> str | None:
    """A loose LoRA's module under the denoiser's own names (kohya's stay flattened, `_` for `.`: resolved
    against the base by `check_compatibility`); None for a text-encoder module."""
    if module.startswith(_TEXT_ENCODER):
        return None
    for prefix in _DENOISER:
        if module.startswith(prefix):
            return module.removeprefix(prefix)
    return module


def lora_alphas(names: Iterable[str], layout: str) -> dict[str, str]:
    """Base weight name -> its `.alpha` tensor (loose layouts; {} for PEFT's, whose config holds alpha)."""
    if layout == "peft":
        return {}
    found = {}
    for name in sorted(names):
        m = _ALPHA.match(name)
        module = _denoiser_module(m.group("module")) if m is not None else None
        if module is not None:
            found[module + ".weight"] = name
    return found


def loose_layout(names: Iterable[str]) -> str | None:
    """"kohya" or "diffusers" when the tensors are an adapter file's and nothing else (factors, alphas),
    else None (a model). A tensor no update here is made of (a Tucker core, OFT, kohya's DoRA scale)
    raises AdapterError naming it."""
    names = sorted(names)
    if not names or not all(_FACTOR.match(n) or _ALPHA.match(n) or _UNREAD.search(n) for n in names):
        return None  # a model (a stray name of these shapes in one is no adapter file)
    for name in names:
        if _UNREAD.search(name):
            raise AdapterError(name, "an adapter tensor no update is read from (LoHa / LoKr Tucker core, OFT, "
                                     "DoRA scale): only LoRA, LoHa and LoKr factors are")
    if not any(_FACTOR.match(n) for n in names):
        return None
    kohya = any(n.startswith(("lora_unet_", "lora_te", "lora_transformer_")) or ".lora_down." in n
                or ".hada_" in n or ".lokr_" in n for n in names)
    return "kohya" if kohya else "diffusers"


def lora_magnitudes(names: Iterable[str]) -> dict[str, str]:
    """Base weight name -> its DoRA magnitude tensor (sorted); {} for a plain LoRA adapter."""
    found = {}
    for name in sorted(names):
        m = _MAGNITUDE.match(name)
        if m is not None:
            found[_strip(m.group("module")) + ".weight"] = name
    return found


def saved_modules(names: Iterable[str]) -> dict[str, str]:
    """Base tensor name -> adapter tensor name for the full copies an adapter saves (modules_to_save)."""
    saved = {}
    for name in sorted(names):
        if ".lora_" in name or _FACTOR.match(name) or _UNREAD.search(name):  # factors, lora_bias, DoRA magnitudes
            continue
        # a copy of a wrapped module (a LoRA target saved whole: resized embeddings) sits under `base_layer`
        base = _strip(name).replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
        saved[base] = name
    return saved


@dataclass(frozen=True, eq=False)
class LoraUpdate:
    """s * B @ A for one base weight, kept as its factors (float64)."""

    weight: str  # the base tensor it updates, e.g. model.layers.0.self_attn.q_proj.weight
    a: np.ndarray  # (r, in), conv kernels flattened to (r, in*kh*kw)
    b: np.ndarray  # (out, r)
    scale: float
    transposed: bool  # the base stores (B @ A).T: fan_in_fan_out layers and embeddings
    weight_shape: tuple[int, ...]  # the shape of the base tensor the update adds to
    magnitude: np.ndarray | None = None  # DoRA: the merged weight's norm per output row (float64); else None
    rank: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank", self.a.shape[0])

    def dense(self) -> np.ndarray:
        """The update at full size, in the base tensor's layout (for tests and small layers only)."""
        delta = self.scale * (self.b @ self.a)
        return (delta.T if self.transposed else delta).reshape(self.weight_shape)


def _update(config: AdapterConfig, weight: str, a: np.ndarray, b: np.ndarray, *, embedding: bool) -> LoraUpdate:
    module = weight.removesuffix(".weight")
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a64.ndim < 2 or b64.ndim < 2 or a64.shape[0] != b64.shape[1] or math.prod(b64.shape[2:]) != 1:
        raise AdapterError(weight, f"lora_A {a64.shape} and lora_B {b64.shape} do not multiply over one rank")
    a_mat, b_mat = a64.reshape(a64.shape[0], -1), b64.reshape(b64.shape[0], b64.shape[1])
    if len(a64.shape) == 4:  # conv: (out, in, kh, kw)
        shape: tuple[int, ...] = (b_mat.shape[0], *a64.shape[1:])
        transposed = False
    else:
        transposed = embedding or config.fan_in_fan_out
        shape = (a_mat.shape[1], b_mat.shape[0]) if transposed else (b_mat.shape[0], a_mat.shape[1])
    return LoraUpdate(weight, a_mat, b_mat, config.scale_for(module), transposed, shape)


# LoHa's and LoKr's updates are kept as low-rank factors too (`_loha`, `_lokr`), of r1 r2 columns; past
# this many the r x r products of the distances stop being small (a LoKr whose two Kronecker factors are
# both whole is a whole matrix): such an update is refused.
MAX_FACTOR_RANK = 1024


def has_factors(config: AdapterConfig) -> bool:
    """Are the adapter's updates low-rank factors `lora_updates` reads? (False: IA3, prompt tuning, ...)"""
    return config.peft_type in PEFT_TYPES


def lora_updates(config: AdapterConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, LoraUpdate]:
    """Every update of the adapter as low-rank factors s * B @ A, keyed by the base weight it updates
    (sorted); a DoRA adapter's carry their magnitudes. Raises AdapterError for a DoRA pair without its
    magnitude (or one of the wrong length), and for magnitudes in an adapter whose config does not say
    use_dora (PEFT would drop them, and the updates would not be the ones trained)."""
    if not has_factors(config):
        return {}  # placed under its declared base only
    magnitudes = lora_magnitudes(tensors)
    if magnitudes and not config.use_dora:
        raise AdapterError(next(iter(magnitudes.values())), "a DoRA magnitude in an adapter whose config does "
                           "not set use_dora: its updates are not what was trained")
    alphas = lora_alphas(tensors, config.layout)
    updates = {}
    for weight, factors in factor_sets(tensors, config.layout).items():
        parts = {role: np.asarray(tensors[name], dtype=np.float64) for role, name in factors.parts.items()}
        builder = {"lora": _lora, "loha": _loha, "lokr": _lokr}[factors.kind]
        update, alpha_rank = builder(config, weight, parts, embedding=factors.embedding)
        if update.rank > MAX_FACTOR_RANK:
            raise AdapterError(weight, f"a {factors.kind} update of rank {update.rank} (over {MAX_FACTOR_RANK}): "
                                       "too large to compare as factors")
        if config.use_dora:
            update = _with_magnitude(update, magnitudes, tensors, embedding=factors.embedding)
        if weight in alphas:  # a file's own alpha per module: s = alpha / r (LyCORIS: 1 with no rank at all)
            update = replace(update, scale=_alpha(alphas[weight], tensors) / alpha_rank if alpha_rank else 1.0)
        updates[weight] = update
    return flux_updates(updates)  # a kohya FLUX LoRA's under diffusers' names (sketches.flux)


def _lora(config: AdapterConfig, weight: str, parts: Mapping[str, np.ndarray], *, embedding: bool) -> tuple[LoraUpdate, int]:
    """s B A; AdaLoRA: s B diag(E) A with s = lora_alpha / r, PEFT's scaling over its `ranknum` (the rank
    it loads the saved factors at)."""
    a = parts["A"]
    if "E" in parts:
        e = parts["E"].reshape(-1)
        if e.size != a.shape[0]:
            raise AdapterError(weight, f"AdaLoRA lora_E of {e.size} values for rank {a.shape[0]}")
        a = a * e.reshape(-1, *([1] * (a.ndim - 1)))
    update = _update(config, weight, a, parts["B"], embedding=embedding)
    if config.peft_type == "ADALORA":
        update = replace(update, scale=config.alpha_for(weight.removesuffix(".weight")) / (update.rank + 1e-5))
    return update, update.rank


def _loha(config: AdapterConfig, weight: str, parts: Mapping[str, np.ndarray], **_: bool) -> tuple[LoraUpdate, int]:
    """(W1a W1b) * (W2a W2b) elementwise, as factors: (X Y) * (Z W) = (X . Z)(Y * W), with . the row-wise
    and * the column-wise Kronecker product (rank r1 r2); s = alpha / r, r LoHa's own rank."""
    w1a, w1b, w2a, w2b = (parts[r].reshape(parts[r].shape[0], -1) for r in ("w1a", "w1b", "w2a", "w2b"))
    if w1a.shape[0] != w2a.shape[0] or w1b.shape[1] != w2b.shape[1] or w1a.shape[1] != w1b.shape[0] \
            or w2a.shape[1] != w2b.shape[0]:
        raise AdapterError(weight, f"LoHa factors {w1a.shape} {w1b.shape} {w2a.shape} {w2b.shape} do not multiply")
    b = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)
    a = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
    shape = (b.shape[0], a.shape[1])
    return LoraUpdate(weight, a, b, config.scale_for(weight.removesuffix(".weight")), False, shape), w1b.shape[0]


def _lokr(config: AdapterConfig, weight: str, parts: Mapping[str, np.ndarray], **_: bool) -> tuple[LoraUpdate, int]:
    """kron(W1, W2), each whole or a low-rank product U V: kron(U1 V1, U2 V2) = kron(U1, U2) kron(V1, V2),
    a whole factor being itself times an identity. A conv's W2 is (out, in, kh, kw): flattened, kron keeps
    the layout. s = alpha / r (PEFT's, decomposed or not); a LyCORIS file's alpha over the decomposed
    factor's rank, 1 when none is (LyCORIS then sets alpha = r)."""
    u1, v1 = _kron_halves(parts, "k1")
    u2, v2 = _kron_halves(parts, "k2")
    b, a = np.kron(u1, u2), np.kron(v1, v2)
    kernel = parts["k2"].shape[2:] if "k2" in parts else ()
    shape = (b.shape[0], a.shape[1] // max(math.prod(kernel), 1), *kernel) if kernel else (b.shape[0], a.shape[1])
    rank = parts["k2a"].shape[1] if "k2a" in parts else parts["k1a"].shape[1] if "k1a" in parts else 0
    return LoraUpdate(weight, a, b, config.scale_for(weight.removesuffix(".weight")), False, shape), rank


def _kron_halves(parts: Mapping[str, np.ndarray], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(U, V) with U V the Kronecker factor `key` (k1 / k2): its two halves, or itself and an identity."""
    if key in parts:
        whole = parts[key].reshape(parts[key].shape[0], -1)
        return whole, np.eye(whole.shape[1])
    u, v = parts[key + "a"], parts[key + "b"]
    return u.reshape(u.shape[0], -1), v.reshape(v.shape[0], -1)


def _alpha(name: str, tensors: Mapping[str, np.ndarray]) -> float:
    values = np.asarray(tensors[name], dtype=np.float64).reshape(-1)
    if values.size != 1 or not math.isfinite(values[0]) or values[0] <= 0:
        raise AdapterError(name, f"alpha must be one positive number, got {values[:3].tolist()}")
    return float(values[0])


def _with_magnitude(update: LoraUpdate, magnitudes: Mapping[str, str], tensors: Mapping[str, np.ndarray], *,
                    embedding: bool) -> LoraUpdate:
    """The update with its DoRA magnitude: one value per output row (PEFT's norm is over dim 1 of the
    weight in (out, in) layout; an embedding's rows are its vocabulary entries)."""
    name = magnitudes.get(update.weight)
    if name is None:
        raise AdapterError(update.weight, "use_dora is set, but the adapter holds no lora_magnitude_vector for it")
    values = np.asarray(tensors[name], dtype=np.float64).reshape(-1)
    rows = update.a.shape[1] if embedding else update.b.shape[0]
    if values.size != rows:
        raise AdapterError(name, f"{values.size} magnitudes for a weight of {rows} output rows")
    if not np.all(np.isfinite(values)):
        raise AdapterError(name, "magnitudes hold NaN or Inf")
    return replace(update, magnitude=values)


# --- norms and distances ------------------------------------------------------------------------------


def _cross(u: LoraUpdate, v: LoraUpdate) -> float:
    """<s_u B_u A_u, s_v B_v A_v>_F through r x r Grams: sum((B_u' B_v) * (A_u A_v'))."""
    return u.scale * v.scale * float(np.sum((u.b.T @ v.b) * (u.a @ v.a.T)))


def update_norm(u: LoraUpdate) -> float:
    """||s B A||_F without forming B A."""
    return math.sqrt(max(_cross(u, u), 0.0))


def _same_layout(u: LoraUpdate, v: LoraUpdate) -> None:
    if u.weight_shape != v.weight_shape or u.transposed != v.transposed:
        raise AdapterError(u.weight, f"updates of shapes {u.weight_shape} and {v.weight_shape} cannot be compared")


def update_distance(u: LoraUpdate, v: LoraUpdate) -> float:
    """||s_u B_u A_u - s_v B_v A_v||_F from r x r products (float64; rounding ~1e-8 of the norms)."""
    _same_layout(u, v)
    return math.sqrt(max(_cross(u, u) + _cross(v, v) - 2.0 * _cross(u, v), 0.0))


def update_distances(first: Mapping[str, LoraUpdate], second: Mapping[str, LoraUpdate]) -> dict[str, float]:
    """Per base weight both adapters update (sorted): the distance between their updates."""
    return {w: update_distance(first[w], second[w]) for w in sorted(set(first) & set(second))}


def difference_singular_values(u: LoraUpdate, v: LoraUpdate | None = None) -> np.ndarray:
    """Singular values (descending) of s_u B_u A_u - s_v B_v A_v (or of u alone), from QR factors.

    At most r_u + r_v of them are non-zero; their tail past the first k (`tail_norm`) says how far the
    difference is from rank k: a chain of checkpoints of one run differs by a few directions.
    """
    if v is not None:
        _same_layout(u, v)
        left = np.concatenate([u.scale * u.b, -v.scale * v.b], axis=1)  # (out, r_u + r_v)
        right = np.concatenate([u.a, v.a], axis=0)  # (r_u + r_v, in)
    else:
        left, right = u.scale * u.b, u.a
    # R only, from C-ordered input: 2.5 ms for 4096 x 32, where Q too (or a transposed view) takes 50-300 ms
    rb = np.linalg.qr(np.ascontiguousarray(left), mode="r")
    ra = np.linalg.qr(np.ascontiguousarray(right.T), mode="r")
    return np.linalg.svd(rb @ ra.T, compute_uv=False)


def tail_norm(singular_values: np.ndarray, k: int) -> float:
    """sqrt of the sum of the squared singular values past the k largest."""
    s = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1]
    return float(np.sqrt(np.sum(s[k:] ** 2)))


# --- compatibility with a base ------------------------------------------------------------------------


@dataclass(frozen=True)
class Compatibility:
    verdict: Literal["compatible", "incompatible"]
    reasons: tuple[str, ...]  # why incompatible (empty when compatible)
    matched: int  # LoRA-updated tensors found in the base with the right shape
    saved_match: tuple[str, ...] = ()  # modules_to_save tensors whose shape equals the base's
    saved_new: tuple[str, ...] = ()  # modules_to_save tensors the base does not have (a new head)
    saved_resized: tuple[str, ...] = ()  # saved vocabulary matrices with tokens added (or cut): other rows only
    base_names: dict[str, str] = field(default_factory=dict)  # adapter's base weight -> the base's name


def _resolver(base_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """Normalised name, and flattened name (`_flat`), -> the base's own name, for names that resolve to
    one tensor only."""
    seen: dict[str, list[str]] = {}
    for name in sorted(base_shapes):
        seen.setdefault(normalise_name(name), []).append(name)
        flat = _flat(normalise_name(name))
        if flat != normalise_name(name):
            seen.setdefault(flat, []).append(name)
    own = {normalise_name(name): name for name in base_shapes}
    for norm, ldm in ldm_names(own).items():  # kohya's SDXL LoRAs name a UNet's LDM modules, flattened
        seen.setdefault(_flat(ldm), []).append(own[norm])
    return {norm: names[0] for norm, names in seen.items() if len(names) == 1}


def _flat(name: str) -> str:
    """kohya's module naming: `down_blocks.0.attn1.to_q.weight` -> `down_blocks_0_attn1_to_q.weight`."""
    return name.removesuffix(".weight").replace(".", "_") + ".weight"


def _resolve(name: str, base_shapes: Mapping[str, tuple[int, ...]], normalised: Mapping[str, str]) -> str | None:
    """The base's name for a tensor the adapter refers to: exact, else by normalised name (task-model
    prefixes like `model.`, `bert.`, `transformer.` differ between a base checkpoint and its task model),
    else by flattened name (a kohya LoRA's; unique matches only)."""
    if name in base_shapes:
        return name
    return normalised.get(normalise_name(name)) or normalised.get(_flat(name))


def _tokens_added(name: str, base_name: str, shape: Sequence[int], base: Sequence[int]) -> str:
    """"<name>: <rows> -> <rows> tokens" for a vocabulary matrix that differs from the base's in its rows
    (tokens) only, else ""."""
    if is_vocabulary(base_name) and len(shape) == 2 == len(base) and shape[1] == base[1]:
        return f"{name}: {base[0]} -> {shape[0]} tokens"
    return ""


def _same_shape(update: tuple[int, ...], base: tuple[int, ...]) -> bool:
    """Equal, or a conv kernel's update kept flattened (LoHa: (out, in kh kw) for (out, in, kh, kw))."""
    if update == base:
        return True
    return len(update) == 2 and len(base) == 4 and update == (base[0], math.prod(base[1:]))


def check_compatibility(updates: Mapping[str, LoraUpdate], saved: Mapping[str, tuple[int, ...]],
                        base_shapes: Mapping[str, tuple[int, ...]]) -> Compatibility:
    """Does the adapter fit a base with these tensor shapes ({name: shape})?

    Compatible when every LoRA-updated tensor exists in the base with the update's shape. `saved`
    ({base name: shape}, from `saved_modules` and the adapter's header) are full copies: one whose
    shape differs from the base's tensor makes the adapter incompatible (PEFT could not load it); one
    the base lacks is a new module (a task head), noted, not held against it. A vocabulary matrix
    (embed_tokens, lm_head) that differs in its rows only is the base's with tokens added: PEFT saves the
    resized embeddings of a fine-tune that added chat tokens (`save_embedding_layers`), and loads them
    into the base once its vocabulary is resized the same way. Noted, not held against it.
    """
    normalised = _resolver(base_shapes)
    reasons, names, matched, resized = [], {}, 0, []
    for weight, update in sorted(updates.items()):
        base = _resolve(weight, base_shapes, normalised)
        if base is None:
            reasons.append(f"{weight}: not in the base")
            continue
        names[weight] = base
        if _same_shape(update.weight_shape, tuple(base_shapes[base])):
            matched += 1
        elif note := _tokens_added(weight, base, update.weight_shape, base_shapes[base]):  # LoRA on resized embeddings
            resized.append(note)
            matched += 1
        else:
            reasons.append(f"{weight}: update is {list(update.weight_shape)}, the base has {list(base_shapes[base])}")
    same, new = [], []
    for name, shape in sorted(saved.items()):
        base = _resolve(name, base_shapes, normalised)
        if base is None:
            new.append(name)
        elif tuple(base_shapes[base]) == tuple(shape):
            same.append(name)
        elif note := _tokens_added(name, base, shape, base_shapes[base]):
            resized.append(note)
        else:
            reasons.append(f"{name} (modules_to_save): saved {list(shape)}, the base has {list(base_shapes[base])}")
    if not updates and not saved:
        reasons.append("the adapter holds no LoRA update and no saved module")
    verdict: Literal["compatible", "incompatible"] = "incompatible" if reasons else "compatible"
    return Compatibility(verdict, tuple(reasons), matched, tuple(same), tuple(new), saved_resized=tuple(resized),
                         base_names=names)


# --- DoRA: the magnitudes against a base's rows ------------------------------------------------------


# Query and key projections: under rotary position embeddings row i of a head is tied to a fixed rotation
# frequency, and rows of one frequency keep alike norms in independently trained models, so their rows are
# not exchangeable between unrelated models (bench/dora.py: unrelated pre-trained bases read a median Z of
# 2.9 with them in, 0.x without). Left out by name, RoPE or not: value, output and MLP rows remain.
_POSITIONAL_ROWS = re.compile(r"(?:^|\.)(?:q|k|q_proj|k_proj|query|key|qkv|qkv_proj|query_key_value|wqkv|Wqkv|"
                              r"c_attn|q_lin|k_lin|in_proj|to_q|to_k)\.weight$")


def exchangeable_rows(weight: str) -> bool:
    """May the rows of this weight be permuted under the magnitude test's null? (Not a query / key.)"""
    return _POSITIONAL_ROWS.search(weight) is None


@dataclass(frozen=True)
class MagnitudeFit:
    """Do a DoRA adapter's magnitudes fit a base's rows? (`magnitude_fit`)"""

    modules: int  # DoRA weights compared (the base rows read for them)
    rows: int  # output rows compared, all modules
    score: float  # the combined Z: ~N(0, 1) when the base is unrelated to the one trained on
    p_value: float  # one-sided, P(N(0, 1) > score)
    related: bool  # p_value < sketches.relatedness.ALPHA
    median_relative_error: float  # median over rows of |m_i - ||W_i|| | / ||W_i||

    def details(self) -> dict[str, object]:
        return {"modules": self.modules, "rows": self.rows, "score": round(self.score, 3),
                "p_value": float(f"{self.p_value:.3g}"), "related": self.related,
                "median_relative_error": float(f"{self.median_relative_error:.3g}")}


def magnitude_fit(updates: Mapping[str, LoraUpdate], base: Mapping[str, np.ndarray],
                  names: Mapping[str, str] | None = None) -> MagnitudeFit | None:
    """Test a DoRA adapter's magnitudes against a base's rows; None when no DoRA weight has base rows.

    `base`: the base's tensors by name, whole or their first rows (a budgeted read: row i of a block is the
    weight's row i); `names`: adapter weight -> the base's name (`Compatibility.base_names`). Per weight,
    the magnitudes m_i of the rows read are set against the base's row norms n_i = ||W_i||, where PEFT
    starts them (B = 0 at init). Not against ||W_i + s (B A)_i||: the adapter's own update would then
    stand on both sides, and a long run's large s B A made an unrelated base's norms "fit" as well (Z 6.8
    on tests/test_dora.py's zoo). The statistic is the relatedness test's (`sketches.relatedness`): under
    "the base is not the model trained on" the rows are exchangeable between m and n, and the permutation
    statistic sum m_i n_i is z = r sqrt(k - 1) from N(0, 1) (r: their correlation over k rows); weights' z
    are combined by their median, as layers are there. On the trained-on base, or a relative of it, m
    follows the norms row by row as long as training moved m by less than the norms differ between rows;
    the relative error says how far it moved. Skipped: transposed layouts (fan_in_fan_out, embeddings:
    the rows read are not output rows), rows of another width than the update's, fewer than MIN_ROWS rows,
    and query / key projections (`exchangeable_rows`)."""
    from sketches.relatedness import MIN_ROWS, combine  # torch: only when a DoRA adapter is tested

    zs, errors, modules = [], [], 0
    for weight, u in sorted(updates.items()):
        block = base.get((names or {}).get(weight, weight))
        if u.magnitude is None or u.transposed or block is None or np.ndim(block) < 2 or not exchangeable_rows(weight):
            continue
        rows = np.asarray(block, dtype=np.float64).reshape(np.shape(block)[0], -1)
        k = rows.shape[0]
        if rows.shape[1] != u.a.shape[1] or k > u.b.shape[0] or k < MIN_ROWS:
            continue
        started, m = np.linalg.norm(rows, axis=1), u.magnitude[:k]
        modules += 1
        errors.append(np.abs(m - started) / np.maximum(started, 1e-30))
        if np.std(m) > 0 and np.std(started) > 0:
            zs.append(float(np.corrcoef(m, started)[0, 1]) * math.sqrt(k - 1))
    if not modules:
        return None
    test = combine(zs)
    every = np.concatenate(errors)
    return MagnitudeFit(modules, int(every.size), test.score, test.p_value, test.related, float(np.median(every)))
