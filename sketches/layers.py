"""Which tensors a method compares, and which models may be compared at all (architecture family).

Input everywhere is a model's tensor shapes, `{name: shape}`, as read from a safetensors header.

Names. Real relatives store the same weights under other names: a task model prefixes its backbone
(`bert.`, `vit.`, `transformer.`, `model.`, `dinov2.`: every architecture's own), a VLM its language tower
(`language_model.`), sentence-transformers saves `0.auto_model.`, a PEFT merge `base_model.model.`, DDP
`module.`, torch.compile `_orig_mod.`; FSDP and activation checkpointing wrap submodules inside a name
(`layers.0._fsdp_wrapped_module.self_attn`); TF / Flax conversions use `/` and `layer_._N`. `normalise_name`
strips those prefixes (repeatedly, at the start only) and inner wrappers, and maps the separators (and Mixtral's expert names to every MoE's: `sketches.experts`), so every comparison below is
on normalised names; `canonical_tensors` also drops what is
not a learned float weight: integer / bool tensors and the known buffers (`position_ids`,
`num_batches_tracked`, GPT-2's causal mask `attn.bias`, rotary `inv_freq`, BART's all-zero `final_logits_bias`,
which an ONNX export folds away, ...), which one library
version saves and the next does not, and which are identical in unrelated models (a mask would make
strangers look related). TF / Flax `kernel`s are stored transposed and keep their name, so they are
compared with other TF kernels only.

Family key. Two models can only be relatives when their body has the same tensors with the same shapes.
The heads (classifier, lm_head, score, DETR's class_labels_classifier, a CNN's top-level `fc` or the
nn.Sequential transfer learning puts in its place, ...) and the vocabulary-sized embeddings are re-drawn or
resized per task, so they are left out of the key: a ViT fine-tuned from 10 to 3 classes stays in its parent's
family. The key is `<arch>-<16 hex of blake2b over the sorted (name, shape) body list>`, where `arch` is
a readable guess (vit, bert, llama, conv, generic) used only for display.

Core. Models whose keys differ can still be relatives (a new layer inserted before the head, a depth
cut, a pooler added): `core_overlap` is the share of the smaller body's values held in tensors both
have with one name and shape (a dense MLP matrix held by a MoE's expert of its name and shape, so a
mergekit-moe shares its dense relatives' whole body). Two keys whose bodies overlap by at least CORE_SHARE are one family
(`merge_families`). Why 0.75: measured on real `transformers` layouts (bench/core_overlap.py, table in
bench/RESULTS.md) overlaps are 0 between other widths, 0.56 between ResNet-18 and ResNet-50 (a shared
stem and first stage, different architectures), and 1.0 for a resized or added head, a depth cut
(BERT 6 of 12 layers) and same-layout models (BERT and RoBERTa, which the relatedness test then keeps
apart); a block inserted before a head reads 0.99 on our zoos' layouts. 0.75 sits in the empty stretch between 0.56
and 0.99, away from both.

Layer selection, per scheme:
- `attention` (MoTHer full fine-tuning, DESIGN.md): the square attention matrices named like
  `attention.attention.{query,key,value}.weight` / `attention.output.dense.weight` (ViT, 48 in ViT-B),
  `attention.self.{query,key,value}.weight` (BERT) or `self_attn.{q,k,v,o}_proj.weight` (Llama).
- `value` (MoTHer LoRA): the value matrices only (`...value.weight`, `self_attn.v_proj.weight`).
- `shared` (ours): every tensor present with the same shape in all models compared, 2-D matrices and
  4-D conv kernels (1-D norms and biases only with `include_1d`), heads included when their shapes agree
  (a kept head is inherited from the parent, so it carries lineage like any other layer).
`dense` lists the dense projections among the selected layers (the paper's own full-FT set, "all
the dense layers"): on the full-FT zoo each of them alone finds the true parent of 30-39 of 41
models, against 24-28 for the patch embedding and the query/key matrices.
Direction (kurtosis) layers: the attention output projections (`attention.output.dense`, `o_proj`) for
full fine-tuning, the value matrices for LoRA; a model with neither falls back to all selected layers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from errors import UnsupportedModelError
from sketches.experts import expert_alias, mixtral_name
from sketches.ldm import unet_names

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]
Scheme = Literal["attention", "value", "shared"]

_ATTENTION = re.compile(
    r"(?:^|\.)(?:attention\.(?:attention|self)\.(?:query|key|value)"
    r"|attention\.output\.dense"
    r"|self_attn\.[qkvo]_proj)\.weight$"
)
_VALUE = re.compile(r"(?:^|\.)(?:attention\.(?:attention|self)\.value|self_attn\.v_proj)\.weight$")
_OUTPUT = re.compile(r"(?:^|\.)(?:attention\.output\.dense|self_attn\.o_proj)\.weight$")
# The "dense" projections (the paper's full-FT layer set, "all the dense layers"): ViT/BERT `*.dense`,
# Llama-style `o_proj`/`gate_proj`/`up_proj`/`down_proj`, GPT-2 `c_proj`/`c_fc`, `fc1`/`fc2`, `out_proj`.
_DENSE = re.compile(r"(?:^|\.)(?:dense|[o]_proj|gate_proj|up_proj|down_proj|c_proj|c_fc|fc1|fc2|out_proj)\.weight$")
# Heads and vocabulary-sized tensors: resized or re-drawn per task, never part of the family key.
_HEAD = re.compile(
    r"(?:^|\.)(?:classifier|lm_head|score|qa_outputs|head|heads|fc_out|pooler)(?:\.|$)"
    r"|(?:^|\.)[a-z]+(?:_[a-z]+)*_classifier(?:\.|$)"  # DETR / YOLOS `class_labels_classifier`: one row per class
    r"|(?:^|\.)(?:embed_tokens|wte|word_embeddings|shared|embed_out)\.weight$"
    # torchvision / timm-style CNN classifiers, top level only: `fc` itself or the nn.Sequential that transfer
    # learning puts in its place (fc.0 Linear, fc.1 BatchNorm, fc.3 Linear), as `classifier.N` above
    r"|^(?:fc|last_linear)\.(?:\d+\.)*(?:weight|bias|running_mean|running_var)$"
)
# Buffers: saved by some library versions and not others, or fixed (masks, rotary tables, index maps);
# never a learned weight, never part of the key or of a comparison.
_BUFFER = re.compile(
    r"(?:^|\.)(?:position_ids|token_type_ids|num_batches_tracked|inv_freq|relative_position_index"
    r"|masked_bias|_float_tensor|attention_mask|final_logits_bias"
    r"|scaled_fp8)$"  # ComfyUI's empty F8 marker of a scaled-fp8 checkpoint (its dtype names the FP8 type)
    r"|(?:^|\.)attn\.bias$"  # GPT-2's causal mask (float32 in older checkpoints)
    r"|(?:^|\.)embed_positions\.weights$"  # M2M100 / NLLB's sinusoidal table (a buffer; learned ones: `.weight`)
)
# Leading prefixes under which the same weights are saved (see the module docstring), longest first.
_PREFIXES = (
    "base_model.model.", "0.auto_model.", "auto_model.", "_orig_mod.", "module.", "model.", "transformer.",
    "bert.", "roberta.", "xlm_roberta.", "distilbert.", "deberta.", "electra.", "albert.", "mpnet.",
    "vit.", "deit.", "beit.", "swin.", "convnext.", "resnet.", "backbone.", "gpt_neox.", "encoder_model.",
    # a vision-language model's language tower (LLaVA: `language_model.model.layers.N`), the LLM it was made from
    "language_model.",
    # ComfyUI's single files and GGUFs of a diffusion model (`model.diffusion_model.blocks.0...`: `model.` goes
    # first), beside the same model's own files (`blocks.0...`)
    "diffusion_model.",
)
# Wrappers PyTorch puts around one submodule, inside a name: FSDP's and activation checkpointing's
# (`model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.self_attn...`, saved by a training script that
# skipped unwrapping), torch.compile of a submodule (`layers.0._orig_mod.mlp`).
_INNER_WRAPPER = re.compile(r"(?:(?<=\.)|^)(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")
# The backbone prefix of every other transformers architecture (its `base_model_prefix`, as transformers
# 5.24 lists them, and of architectures it has since dropped): a task model `XForY` saves its backbone under it,
# the bare `XModel` without. Many bases are published bare (facebook/dinov2-base, facebook/hubert-base-ls960)
# and their fine-tunes as task models, which without this shared 0 % of their core. Left out: names that are
# also one tower or half of a model holding several side by side (`decoder`, `text_model`, `vision_model`,
# `vision_tokenizer`, `tracker_model`), where stripping would merge two parts.
_TASK_PREFIXES = frozenset({
    "aimv2", "align", "altclip", "audio_spectrogram_transformer", "biogpt", "bit", "blip", "bridgetower",
    "bros", "canine", "chinese_clip", "chmv2", "clap", "clip", "convbert", "convnextv2", "cpmant", "cvt",
    "dac", "data2vec_audio", "data2vec_text", "data2vec_vision", "decision_transformer", "depth_anything",
    "depth_pro", "dinat", "dinov2", "dinov2_with_registers", "donut", "dpt", "edgetam", "edgetam_video",
    "efficientloftr", "efficientnet", "encodec", "eomt", "eomt_dinov3", "ernie", "esm", "esmc", "esmfold2",
    "fastspeech2_conformer", "flava", "fnet", "focalnet", "funnel", "git", "glpn", "gpt_neox_japanese",
    "groupvit", "gte", "hgnetv2", "hiera", "hubert", "ibert", "ijepa", "internvl_vision", "layoutlm",
    "layoutlmv2", "layoutlmv3", "led", "levit", "lightglue", "lilt", "longformer", "luke", "lw_detr_vit",
    "lxmert", "markuplm", "metaclip_2", "mgp_str", "mimi", "mobilebert", "mobilenet_v1", "mobilenet_v2",
    "mobilevit", "mobilevitv2", "mra", "neucodec", "nomic_bert", "nystromformer", "owlv2", "owlvit",
    "perceiver", "phi4_vision", "pixio", "pocket_tts_audio_tokenizer", "poolformer", "prompt_depth_anything",
    "prophetnet", "pvt", "pvt_v2", "rag", "reformer", "regnet", "rembert", "rf_detr_dinov2",
    "roberta_prelayernorm", "roc_bert", "roformer", "rwkv", "sam", "sam2", "sam2_video", "sam3_tracker",
    "sam3_video", "sam_hq", "seamless_m4t", "seamless_m4t_v2", "segformer", "sew", "sew_d", "siglip",
    "siglip2", "speecht5", "splinter", "superglue", "superpoint", "swiftformer", "swin2sr", "swinv2",
    "switch_transformers", "tapas", "textnet", "timesformer", "timm_model", "unispeech", "unispeech_sat",
    "vibevoice_acoustic_tokenizer", "videomae", "videomt", "vilt", "visual_bert", "vitdet", "vits", "vivit",
    "vjepa2", "wav2vec2", "wav2vec2_bert", "wav2vec2_conformer", "wavlm", "x_clip", "xcodec", "xcodec2",
    "yoso", "zoedepth",
    # dropped since transformers 4.x, still on the Hub
    "efficientformer", "ernie_m", "mctct", "mega", "nat", "nezha", "realm", "tvlt", "van",
})
# The prefixes a wrapper adds when it re-saves a model (DDP, torch.compile, sentence-transformers, a PEFT
# merge, a Lightning module): a copy whose names carry more of them is the re-save, not the original.
# `model.` is a wrapper unless it is the library's own decoder naming (LlamaForCausalLM: model.layers.N).
_WRAPPERS = ("base_model.model.", "0.auto_model.", "auto_model.", "module.", "model.")  # `_orig_mod.`: inner
_OWN_MODEL_PREFIX = re.compile(r"^model\.(?:layers|embed_tokens|norm|decoder|encoder|embed_positions)\b")
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
CORE_SHARE = 0.75
_ARCH_HINTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("vit", re.compile(r"attention\.attention\.query\.weight$")),
    ("bert", re.compile(r"attention\.self\.query\.weight$")),
    ("llama", re.compile(r"self_attn\.q_proj\.weight$")),
)


@dataclass(frozen=True)
class LayerSelection:
    """The tensors to compare (`distance`) and those whose kurtosis orders an edge (`direction`)."""

    distance: tuple[str, ...]
    direction: tuple[str, ...]
    dense: tuple[str, ...] = ()  # the dense projections among `distance` (mother's full-FT distance)


def is_head(name: str) -> bool:
    return _HEAD.search(name) is not None


_VOCAB = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|shared|embed_out|lm_head)\.weight$")


def is_vocabulary(name: str) -> bool:
    """A vocabulary-sized matrix (token embeddings, lm_head): one row per token, resized when tokens are added."""
    return _VOCAB.search(name) is not None


# output vocabulary matrices tied to the input embedding in transformers: GPT-2 / Llama-style `lm_head`, GPT-NeoX
# `embed_out`, BERT / ALBERT `predictions.decoder`, RoBERTa `lm_head.decoder`, DistilBERT `vocab_projector`, Whisper `proj_out`
_OUTPUT_VOCAB = re.compile(r"(?:^|\.)(?:lm_head|embed_out|predictions\.decoder|lm_head\.decoder|vocab_projector)\.weight$"
                           r"|^proj_out\.weight$")
_INPUT_VOCAB = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|shared|embed_in)\.weight$")
TIED_CHECK_ROWS = 8  # rows compared at each end of a vocabulary matrix: bit-identical ends are one tensor


def tied_heads(shapes: Mapping[str, Shape], rows_of: Callable[[str, tuple[int, int]], np.ndarray]) -> list[str]:
    """Output vocabulary heads (`lm_head`) stored as a bit-for-bit copy of the model's input embedding: a
    tied weight saved twice. transformers' save_pretrained writes it once, other tools (and older
    conversions) twice, so a re-save read as it is would differ from its source by a whole head: no
    `duplicate`, and one more vocabulary matrix in the distance (wild-gpt2 with every tied head written:
    edge accuracy 1.000 -> 0.952). Compared on the first and last TIED_CHECK_ROWS rows, read by `rows_of(name,
    (first, end))`: an untied head trained apart shares no row with the embedding bit for bit."""
    inputs = [n for n in shapes if _INPUT_VOCAB.search(n) and len(shapes[n]) == 2]
    out = []
    for name in sorted(n for n in shapes if _OUTPUT_VOCAB.search(n)):
        rows = shapes[name][0] if shapes[name] else 0
        ends = sorted({(0, min(rows, TIED_CHECK_ROWS)), (max(0, rows - TIED_CHECK_ROWS), rows)})
        for embedding in (n for n in inputs if tuple(shapes[n]) == tuple(shapes[name])):
            if rows and all(np.array_equal(rows_of(name, e), rows_of(embedding, e)) for e in ends):
                out.append(name)
                break
    return out


def is_task_head(name: str) -> bool:
    """A head re-drawn per task (classifier, score, fc, pooler, ...), not a vocabulary-sized matrix."""
    return is_head(name) and _VOCAB.search(name) is None


def is_buffer(name: str) -> bool:
    return _BUFFER.search(name) is not None


def normalise_name(name: str) -> str:
    """The name a tensor is compared under: framework separators mapped, known prefixes stripped."""
    out = mixtral_name(name.removesuffix(":0").replace("/", "."))
    out = re.sub(r"layer_\._(\d+)", r"layer.\1", out)
    out = re.sub(r"^tf_[a-z0-9_]+\.", "", out)  # a TF main layer's name (tf_bert_model/...)
    out = _INNER_WRAPPER.sub("", out)
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if out.startswith(prefix) and len(out) > len(prefix):
                out, stripped = out[len(prefix):], True
                break
        else:
            first, dot, rest = out.partition(".")
            if dot and rest and first in _TASK_PREFIXES:
                out, stripped = rest, True
    return out


def wrapper_depth(name: str) -> int:
    """How many wrappers a stored tensor name holds: prefixes (see _WRAPPERS) and FSDP / checkpointing /
    compile wrappers inside it (_INNER_WRAPPER)."""
    inner = len(_INNER_WRAPPER.findall(name))
    depth, rest = 0, _INNER_WRAPPER.sub("", name)
    while True:
        prefix = next((p for p in _WRAPPERS if rest.startswith(p) and len(rest) > len(p)), None)
        if prefix is None or (prefix == "model." and _OWN_MODEL_PREFIX.match(rest)):
            return depth + inner
        depth, rest = depth + 1, rest[len(prefix):]


class _HasDtype(Protocol):
    @property
    def dtype(self) -> str: ...


def canonical_tensors(infos: Mapping[str, _HasDtype]) -> dict[str, str]:
    """{normalised name: stored name} of the learned float tensors (buffers and integers dropped).

    Two stored names that normalise alike (a file holding both `model.x` and `x`) keep the first in
    sorted order, logged: the rest of the pipeline needs one tensor per name. A single-file Stable
    Diffusion checkpoint is its UNet under diffusers' names (`sketches.ldm`), as a pipeline is its denoiser."""
    unet = unet_names(infos)
    if unet:
        logger.info("a single-file SD checkpoint: its UNet's %d tensors compared under diffusers' names, "
                    "the other %d (autoencoder, text encoders) not read", len(unet), len(infos) - len(unet))
    out: dict[str, str] = {}
    for raw in sorted(unet or infos):
        if infos[raw].dtype not in FLOAT_DTYPES or is_buffer(raw):
            continue
        name = normalise_name(unet.get(raw, raw))
        if name in out:
            logger.warning("%s and %s are both %s after normalising; keeping %s", out[name], raw, name, out[name])
            continue
        out[name] = raw
    return out


def _body(shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    return {name: tuple(shape) for name, shape in shapes.items() if not is_head(name) and not is_buffer(name)}


def core_overlap(a: Mapping[str, Shape], b: Mapping[str, Shape]) -> float:
    """Share of the smaller body's values in tensors both bodies hold with one name and shape (0..1).

    A dense MLP matrix is held by a MoE holding an expert of that name and shape (`sketches.experts`):
    a MoE made of its dense relatives' MLPs shares their whole body."""
    body_a, body_b = _body(a), _body(b)
    size_a = sum(math.prod(s) for s in body_a.values())
    size_b = sum(math.prod(s) for s in body_b.values())
    if not size_a or not size_b:
        return 0.0
    small, large = (body_a, body_b) if size_a <= size_b else (body_b, body_a)
    experts = {(expert_alias(n), s) for n, s in large.items() if expert_alias(n)}
    shared = sum(math.prod(s) for n, s in small.items() if large.get(n) == s or (n, s) in experts)
    return shared / min(size_a, size_b)


def merge_families(bodies: Mapping[str, Mapping[str, Shape]], *, share: float = CORE_SHARE) -> dict[str, str]:
    """key -> the key of its merged family: keys whose bodies overlap by >= `share` are one family.

    Union-find over the keys in sorted order; a merged family is named by its smallest key, so the
    answer does not depend on the order the keys arrive in. A key overlapping two families joins both,
    which makes them one (their models are comparable through it)."""
    keys = sorted(bodies)
    root = {k: k for k in keys}

    def find(k: str) -> str:
        while root[k] != k:
            root[k] = root[root[k]]
            k = root[k]
        return k

    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if find(a) != find(b) and core_overlap(bodies[a], bodies[b]) >= share:
                ra, rb = sorted((find(a), find(b)))
                root[rb] = ra
    return {k: find(k) for k in keys}


def architecture_hint(shapes: Mapping[str, Shape]) -> str:
    for arch, pattern in _ARCH_HINTS:
        if any(pattern.search(name) for name in shapes):
            return arch
    if any(len(shape) == 4 for shape in shapes.values()):
        return "conv"
    return "generic"


def family_key(shapes: Mapping[str, Shape]) -> str:
    """`<arch>-<digest>` over the body tensors (heads and vocab embeddings excluded), order-free."""
    body = sorted((name, list(shape)) for name, shape in _body(shapes).items())
    if not body:
        raise UnsupportedModelError("weights", "no body tensors: only heads or embeddings were found")
    digest = hashlib.blake2b(json.dumps(body).encode(), digest_size=8).hexdigest()
    return f"{architecture_hint(shapes)}-{digest}"


def shared_tensors(models: Sequence[Mapping[str, Shape]], *, include_1d: bool = False) -> tuple[str, ...]:
    """Names present with one shape in every model; 2-D and 4-D (plus 1-D when asked), sorted."""
    if not models:
        return ()
    first = models[0]
    keep = []
    for name in sorted(first):
        shape = first[name]
        if len(shape) not in ((1, 2, 4) if include_1d else (2, 4)):
            continue
        if all(other.get(name) == shape for other in models[1:]):
            keep.append(name)
    return tuple(keep)


def _square_matching(pattern: re.Pattern[str], names: Sequence[str], shapes: Mapping[str, Shape]) -> tuple[str, ...]:
    return tuple(n for n in names if pattern.search(n) and len(shapes[n]) == 2 and shapes[n][0] == shapes[n][1])


def select_layers(
    models: Sequence[Mapping[str, Shape]], *, scheme: Scheme, include_1d: bool = False
) -> LayerSelection:
    """The layers `scheme` compares across `models` (only tensors they all share with one shape)."""
    common = shared_tensors(models, include_1d=include_1d)
    if not common:
        raise UnsupportedModelError("models", "they share no tensor of equal shape: nothing to compare")
    shapes = models[0]
    if scheme == "attention":
        distance = _square_matching(_ATTENTION, common, shapes)
        direction = _square_matching(_OUTPUT, common, shapes)
    elif scheme == "value":
        distance = _square_matching(_VALUE, common, shapes)
        direction = distance
    else:
        distance = common
        direction = _square_matching(_OUTPUT, common, shapes)
    if not distance:
        raise UnsupportedModelError(
            "models", f"no tensor matches the {scheme!r} layer pattern; use --method mother (any architecture)"
        )
    dense = tuple(n for n in distance if _DENSE.search(n) and not is_head(n))
    return LayerSelection(distance=distance, direction=direction or distance, dense=dense)
