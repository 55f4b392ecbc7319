"""llama.cpp's own converter against our GGUF reader: which Hugging Face tensor each GGUF tensor is, measured.

    .venv/bin/python bench/gguf_converter.py --llama-cpp DIR [--write sketches/gguf_names.json]
                                             [--fixtures tests/data/gguf_converter] [MODEL_TYPE ...]

DIR is llama.cpp's source tree (the folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/); the
converter runs in its own process with its own gguf-py, as convert_hf_to_gguf.py runs; our reader uses the venv's
gguf. The tree measured here is the copy inside the llama-cpp-python sdist, fetched from PyPI, never built:

    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp   # DIR = /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp

For each transformers model type (default: every one listed in MODEL_TYPES):
1. a small random model of that type, built by transformers from its own config class and saved as safetensors;
2. converted to an F32 GGUF by llama.cpp's own model class for it (`conversion.get_model_class`, vocabulary
   skipped: a random model has no tokenizer; vocabulary rows are cut where the converter cuts them);
3. each GGUF tensor matched to the source tensor it came from: among gguf's own aliases for its name (the
   spellings `TensorNameMap` maps from), the one the source holds, else the source tensor of equal values; then
   how its values relate: `exact`, `permuted` (llama's q/k row order), `transposed`, `regrouped` (a fused
   q/k/v by part, not by kv group), `reshaped` (a squeezed axis: Mamba's conv1d), or `changed` (anything
   else: Gemma's norms + 1, Mamba's A = -exp(A_log), MLA's split kv_b, ...);
4. our reader (`sketches.gguf.hf_names` / `read_hf_tensor`) scored on the same file: tensors read bit for bit
   under the source's name, read under the right name with other values, read under a name the source lacks,
   and source tensors the GGUF holds that we do not read.

`--write` writes the measured name table (`sketches.gguf` reads it: the names each architecture's
converter really uses, and which tensors it changes); `--fixtures` keeps a few pairs (safetensors + Q8_0 GGUF
made by the converter) for the tests. The table only ever adds names the converter was seen to write.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from sketches.gguf import _qkv_rows, hf_names, read_header, read_hf_tensor  # noqa: E402
from sketches.layers import normalise_name  # noqa: E402
from sketches.safetensors import FileSource, open_local_repo  # noqa: E402

logger = logging.getLogger("bench.gguf_converter")

# transformers model types llama.cpp converts, with a small config of each (dimensions only: the converter
# reads the same config.json keys whatever the size). Layer counts stay the library's default where the
# config lists layer kinds by index (hybrids); 2 elsewhere.
MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
               "gemma3_text", "phi", "phi3", "starcoder2", "gpt_bigcode", "gpt2", "bloom", "stablelm", "olmo",
               "olmo2", "olmoe", "cohere", "granite", "granitemoe", "granitemoehybrid", "smollm3", "mamba",
               "mamba2", "jamba", "lfm2", "falcon_h1", "deepseek_v2", "glm4", "exaone4", "seed_oss", "ernie4_5",
               "nemotron_h", "bert", "modernbert", "t5", "qwen3_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
               "gemma3", "gpt_oss", "glm4_moe", "ernie4_5_moe", "minicpm3", "apertus", "arcee", "afmoe", "exaone_moe",
               "hunyuan_v1_dense", "dots1", "llama4_text", "olmo3", "jais2")
SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             vocab_size=256, max_position_embeddings=128, moe_intermediate_size=32, num_experts=4,
             n_routed_experts=4, num_local_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=64,
             n_embd=64, n_head=4, n_inner=128, d_model=64, d_ff=128, num_heads=4, d_kv=16, n_positions=128,
             n_layer=2, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
             mamba_d_state=8, mamba_n_heads=4, mamba_d_head=32, state_size=8, expand=2, conv_kernel=4,
             time_step_rank=4, mamba_expand=2, block_ff_dim=128, n_shared_experts=1, shared_intermediate_size=64,
             global_attn_every_n_layers=2)
OVERRIDES = {"mamba2": dict(head_dim=32, num_heads=4, n_groups=1), "falcon_h1": dict(mamba_d_ssm=128, mamba_n_groups=1),
             "deepseek_v2": dict(num_key_value_heads=4)}
# (qwen3_vl_moe is left out: transformers 5.24 saves its experts as (E, 2I, H) / (E, H, I), the Hub's checkpoints
# and this converter have them as (E, H, 2I) / (E, I, H): the converter's file is then itself wrong)
# keys the converter reads under their transformers 4 names (what the Hub's config.json files hold)
# (GPT-NeoX and Falcon are not converted at all from a transformers 5 config: the converter reads rotary_pct /
# n_head, which transformers 5's config classes no longer keep; tests/test_gguf_architectures covers them)
CONFIG_EXTRA = {"gpt2": {"n_ctx": 128}, "t5": {"decoder_start_token_id": 0}, "falcon_h1": {"head_dim": 16}}
VISION = dict(depth=1, num_hidden_layers=1, embed_dim=64, hidden_size=64, out_hidden_size=64, num_heads=4,
              num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8, num_position_embeddings=16,
              deepstack_visual_indexes=[0])
BASE_CLASSES = {"bert": "BertModel", "modernbert": "ModernBertModel", "t5": "T5ForConditionalGeneration"}
LAYER_PATTERNS = ("layer_types", "hybrid_override_pattern", "attn_layer_period", "layers_block_type", "full_attn_idxs")
# the tests' pairs (tests/test_gguf_converter.py): a few layers each, so the files stay small; LFM2's layer kinds
# given (its default config is attention only), so its short-conv blocks are converted and measured too
FIXTURES = {"qwen3": {"num_hidden_layers": 2}, "phi3": {"num_hidden_layers": 2}, "olmo": {"num_hidden_layers": 2},
            "mamba": {"num_hidden_layers": 2},
            "lfm2": {"num_hidden_layers": 4, "layer_types": ["conv", "full_attention", "conv", "full_attention"]}}


def small_config(model_type: str, layers: dict | None = None):
    """A small config of `model_type`; `layers`: config arguments fixing the depth (kept as the library's
    default otherwise, as above)."""
    import transformers

    cfg = transformers.AutoConfig.for_model(model_type, **(layers or {}))
    # a vision-language model: its text and vision towers shrunk alike (only the text tower is converted)
    for part in (cfg, getattr(cfg, "text_config", None), getattr(cfg, "vision_config", None)):
        for key, value in {**SMALL, **OVERRIDES.get(model_type, {}), **(VISION if part is not cfg and part is
                           getattr(cfg, "vision_config", None) else {})}.items():
            if part is not None and hasattr(part, key):
                with contextlib.suppress(Exception):
                    setattr(part, key, value)
    depth = getattr(cfg, "num_hidden_layers", None)
    if not layers and isinstance(depth, int) and depth > 8 and not any(hasattr(cfg, a) for a in LAYER_PATTERNS):
        cfg.num_hidden_layers = 2
    if model_type == "t5":
        cfg.num_layers = cfg.num_decoder_layers = 2
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(cfg, key, None), int) and getattr(cfg, key) >= SMALL["vocab_size"]:
            setattr(cfg, key, 1)
    return cfg


def make_model(model_type: str, out: Path, layers: dict | None = None, *, bf16: bool = False) -> None:
    """A random model of `model_type` saved by transformers, with a tokenizer.json listing its vocabulary (the
    converter cuts Gemma's embedding to the tokenizer's size)."""
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    torch.manual_seed(0)
    cfg = small_config(model_type, layers)
    cls = getattr(transformers, BASE_CLASSES.get(model_type) or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
                  or MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type])
    model = cls(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    (model.to(torch.bfloat16) if bf16 else model).save_pretrained(out)
    config = json.loads((out / "config.json").read_text()) | CONFIG_EXTRA.get(model_type, {})
    # transformers 5 nests rope_theta / partial_rotary_factor in rope_parameters; the checkpoints on the Hub
    # (transformers 4) and the converters reading them have them at the top level
    for key, value in (config.get("rope_parameters") or {}).items():
        if key in ("rope_theta", "partial_rotary_factor"):
            config.setdefault(key, value)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    vocab = {f"t{i}": i for i in range(getattr(cfg, "vocab_size", SMALL["vocab_size"]))}
    (out / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}, "added_tokens": []}))


_DRIVER = """
import contextlib, io, sys
from pathlib import Path
import gguf, torch
from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
src, dst, outtype = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
klass = get_model_class(get_model_architecture(ModelBase.load_hparams(src, False), ModelType.TEXT), mmproj=False)
for c in klass.__mro__:  # a random model has no tokenizer: the vocabulary is the one step skipped
    if "set_vocab" in c.__dict__:
        c.set_vocab = lambda self: None
if hasattr(klass, "no_mtp"):
    klass.no_mtp = True
ftype = gguf.LlamaFileType["ALL_F32" if outtype == "F32" else "MOSTLY_" + outtype]
with torch.inference_mode(), contextlib.redirect_stderr(io.StringIO()):
    klass(src, ftype, dst, eager=True).write()
print(klass.__name__)
"""


def convert(llama_cpp: Path, src: Path, dst: Path, outtype: str = "F32") -> str:
    """`src` converted by llama.cpp's own model class for its architecture, in a process of its own with its own
    gguf-py (as convert_hf_to_gguf.py runs); returns that class's name."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(llama_cpp), str(llama_cpp / "gguf-py")]), "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(src), str(dst), outtype], env=env, capture_output=True,
                          text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    return done.stdout.strip().splitlines()[-1]


def source_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the saved model as our safetensors reader sees it (fused MoE experts as one matrix each)."""
    with open_local_repo(folder) as repo:
        return {name: repo.read(name) for name in repo.tensors()}


def _aliases(arch: str, blocks: int) -> dict[str, list[str]]:
    """gguf name (no suffix) -> every HF spelling gguf's TensorNameMap maps to it, in gguf's order."""
    import gguf

    kind = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    out: dict[str, list[str]] = defaultdict(list)
    for key, (_, name) in gguf.TensorNameMap(kind, blocks).mapping.items():
        out[name].append(key)
    return out


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute undone: rows (heads, d/2, 2) back to (heads, 2, d/2)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def relation(gg: np.ndarray, hf: np.ndarray, heads: tuple[int, ...]) -> str:
    """How a GGUF tensor's values relate to its source tensor's. `heads`: (attention heads, kv heads)."""
    if gg.size != hf.size:
        return "changed"
    if gg.shape == hf.shape and len(heads) == 2 and gg.shape[0] % (heads[0] + 2 * heads[1]) == 0:
        # a fused q/k/v stored by kv group in HF, by part in GGUF (GPT-NeoX, BLOOM, Falcon: sketches.gguf)
        order = _qkv_rows(np.arange(gg.shape[0]), heads[0], heads[1], gg.shape[0])
        if not np.array_equal(gg, hf) and np.array_equal(gg[order], hf):
            return "regrouped"
    if np.array_equal(gg.reshape(hf.shape), hf):
        return "exact" if gg.shape == hf.shape else "reshaped"
    if gg.ndim == 2 and gg.shape == hf.shape[::-1] and np.array_equal(gg.T, hf):
        return "transposed"
    if gg.shape == hf.shape and gg.ndim <= 2:
        for h in set(heads):
            if gg.shape[0] % (2 * h) == 0 and np.array_equal(_unpermute(gg, h), hf):
                return "permuted"
    return "changed"


def _equal_values(source: dict[str, np.ndarray], values: np.ndarray) -> list[str]:
    flat = values.reshape(-1)
    return [n for n, v in source.items() if v.size == flat.size and np.array_equal(v.astype(np.float32).reshape(-1), flat)]


def match(gguf_path: Path, source: dict[str, np.ndarray], heads: tuple[int, ...]) -> dict[str, tuple[str | None, str]]:
    """GGUF tensor name -> (source tensor name, relation). A stacked expert tensor (blk.N.ffn_*_exps) is matched
    by its expert 0 and 1 (`#0`, `#1`); a tensor made from several source tensors, or changed past recognition,
    is (None, "unmatched")."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    blocks = 1 + max((int(m.group(1)) for t in reader.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))), default=0)
    aliases = _aliases(arch, blocks)
    by_norm = {normalise_name(n): n for n in source}
    out: dict[str, tuple[str | None, str]] = {}
    for t in reader.tensors:
        gg = np.asarray(t.data, dtype=np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))
        if "_exps" in t.name and gg.ndim == 3:
            for e in range(min(2, gg.shape[0])):
                equal = _equal_values(source, gg[e])
                out[f"{t.name}#{e}"] = (equal[0], "exact") if len(equal) == 1 else (None, "unmatched")
            continue
        stem, _, suffix = t.name.rpartition(".") if t.name.endswith((".weight", ".bias")) else (t.name, "", "")
        suffix = "." + suffix if suffix else ""
        named = [n for key in aliases.get(stem, []) if (n := by_norm.get(normalise_name(key + suffix)))]
        if not named:
            named = _equal_values(source, gg)
            named = named if len(named) == 1 else []
        out[t.name] = (named[0], relation(gg, source[named[0]].astype(np.float32), heads)) if named else (None, "unmatched")
    return out


def score_reader(gguf_path: Path, source: dict[str, np.ndarray]) -> dict[str, object]:
    """Our reader on the file: read exactly under the source's (normalised) name, other values, a name the
    source lacks; and source tensors not read."""
    src = {normalise_name(n): v for n, v in source.items()}
    counts = {"exact": 0, "other values": 0, "no such name": 0}
    seen, bad = set(), []
    with FileSource(gguf_path) as fs:
        header = read_header(fs)
        for key, name in hf_names(header).items():
            hf = normalise_name(name.hf_name)
            if hf not in src:
                counts["no such name"] += 1
                bad.append(f"{key} -> {name.hf_name} (no such name)")
                continue
            seen.add(hf)
            got, want = read_hf_tensor(fs, header, name), src[hf].astype(np.float32)
            if got.shape == want.shape and np.array_equal(got, want):
                counts["exact"] += 1
            else:
                counts["other values"] += 1
                bad.append(f"{key} -> {name.hf_name} (other values)")
    counts["not read"] = sum(1 for n in src if n not in seen)
    counts["examples"] = bad[:3]
    return counts


def _template(name: str) -> tuple[str, dict[str, str]]:
    """A GGUF name with its block index as {bid} (and a stacked expert's `#e` as {xid}), and those indices."""
    found = {}
    if bid := re.match(r"blk\.(\d+)\.", name):
        found["bid"] = bid.group(1)
        name = "blk.{bid}." + name[bid.end():]
    if xid := re.search(r"#(\d+)$", name):
        found["xid"] = xid.group(1)
        name = name[:xid.start()]
    return name, found


def _hf_template(name: str, found: dict[str, str]) -> str:
    """The source name with the GGUF's block index (the first such component) and expert index as {bid}, {xid}."""
    for key in ("bid", "xid"):
        if key in found:
            name = re.sub(rf"(?<=\.){found[key]}(?=\.)", "{" + key + "}", name, count=1)
    return name


def table_entries(matched: dict[str, tuple[str | None, str]]) -> dict[str, dict[str, str | None]]:
    """{gguf name template: {"hf": HF name template or None, "values": relation}}; indices as {bid} / {xid}."""
    out: dict[str, dict[str, str | None]] = {}
    for gname, (hname, rel) in sorted(matched.items()):
        gtemplate, found = _template(gname)
        entry = {"hf": None if hname is None else _hf_template(hname, found), "values": rel}
        if out.setdefault(gtemplate, entry) != entry:
            out[gtemplate] = {"hf": None, "values": "ambiguous"}
    return out


def write_fixture(llama_cpp: Path, model_type: str, work: Path, keep: Path) -> None:
    """A test pair: a shallow random model of `model_type` (BF16 safetensors + config.json, as the Hub's
    checkpoints are) and its Q8_0 GGUF made by llama.cpp's converter."""
    make_model(model_type, work, FIXTURES[model_type], bf16=True)
    shutil.rmtree(keep, ignore_errors=True)
    (keep / "source").mkdir(parents=True)
    (keep / "gguf").mkdir()
    for f in ("model.safetensors", "config.json"):
        shutil.copy(work / f, keep / "source" / f)
    convert(llama_cpp, work, keep / "gguf" / "model-Q8_0.gguf", outtype="Q8_0")


def _compared(entry: dict[str, str | None]) -> tuple[str | None, str | None]:
    hf = entry["hf"]
    return (None if hf is None else normalise_name(hf.replace("{bid}", "0").replace("{xid}", "0"))), entry["values"]


def run(llama_cpp: Path, model_types: list[str], work: Path, fixtures: Path | None) -> tuple[dict, list[str]]:
    import gguf

    table: dict[str, dict] = {}
    conflicts: dict[str, set[str]] = defaultdict(set)
    lines = ["| model type | llama.cpp class | GGUF tensors | read exactly | other values | name not in source | "
             "source tensors not read |", "|---|---|---|---|---|---|---|"]
    for mt in model_types:
        folder = work / mt
        shutil.rmtree(folder, ignore_errors=True)
        try:
            make_model(mt, folder / "hf", FIXTURES.get(mt))
            klass = convert(llama_cpp, folder / "hf", folder / "model.gguf")
        except Exception as exc:  # noqa: BLE001 -- a type this converter or transformers version cannot do: reported
            lines.append(f"| {mt} | not converted: {type(exc).__name__}: {str(exc)[:80]} | | | | | |")
            continue
        source = source_tensors(folder / "hf")
        cfg = json.loads((folder / "hf" / "config.json").read_text())
        n_head = cfg.get("num_attention_heads") or cfg.get("n_head")
        n_kv = cfg.get("num_key_value_heads") or n_head
        heads = (n_head, n_kv) if isinstance(n_head, int) and isinstance(n_kv, int) else ()
        arch = str(bytes(gguf.GGUFReader(str(folder / "model.gguf")).fields["general.architecture"].parts[-1]), "utf-8")
        for gname, entry in table_entries(match(folder / "model.gguf", source, heads)).items():
            have = table.setdefault(arch, {}).setdefault(gname, entry)
            if _compared(have) != _compared(entry):  # a VLM's `model.language_model.` prefix is no disagreement
                conflicts[arch].add(gname)
        s = score_reader(folder / "model.gguf", source)
        lines.append(f"| {mt} | {klass} ({arch}) | {len(gguf.GGUFReader(str(folder / 'model.gguf')).tensors)} | "
                     f"{s['exact']} | {s['other values']} | {s['no such name']} | {s['not read']} |")
        for example in s["examples"]:
            lines.append(f"|  | {example} | | | | | |")
        if fixtures is not None and mt in FIXTURES:
            write_fixture(llama_cpp, mt, folder / "fixture", fixtures / mt)
    for arch, names in conflicts.items():  # two model types of one architecture disagree: the name is not known
        for gname in names:
            table[arch][gname] = {"hf": None, "values": "ambiguous"}
    return table, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp's source tree (convert_hf_to_gguf.py's folder)")
    parser.add_argument("--write", type=Path, help="write the measured name table here (JSON)")
    parser.add_argument("--fixtures", type=Path, help="keep safetensors + Q8_0 GGUF pairs of a few types here")
    parser.add_argument("model_types", nargs="*", default=list(MODEL_TYPES))
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    import importlib.metadata as md

    with tempfile.TemporaryDirectory() as tmp:
        table, lines = run(args.llama_cpp, args.model_types, Path(tmp), args.fixtures)
    print("\n".join(lines))
    if args.write:
        version = re.search(r"llama_cpp_python-([\d.]+)", str(args.llama_cpp.resolve()))
        payload = {"version": 1, "made_by": "bench/gguf_converter.py",
                   "llama_cpp": f"llama-cpp-python {version.group(1)}" if version else str(args.llama_cpp),
                   "transformers": md.version("transformers"),
                   "architectures": {a: dict(sorted(v.items())) for a, v in sorted(table.items())}}
        args.write.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.write}: {sum(len(v) for v in table.values())} names over {len(table)} architectures")


if __name__ == "__main__":
    main()
