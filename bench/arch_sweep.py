"""Architecture sweep: does batch recovery put every model under its true parent, across many real
`transformers` architectures?

For each architecture a tiny config (hidden 16-64, 2 layers, vocab 128) of the library's own model class
(a task head where natural: *ForCausalLM, *ForMaskedLM, *ForSequenceClassification, *ForImageClassification,
...) is trained for real on random data, as a five-model family:

    base      seed-0 random init, 30 Adam steps (lr 1e-3)            "pre-training"
    stranger  seed-1 random init, trained like base                   an unrelated root
    ft1, ft2  20 Adam steps from base, each on its own random data    fine-tunes
    ft1-ft    20 Adam steps from ft1                                  a fine-tune of a fine-tune

Losses: the model's own loss given labels (next-token loss for causal and seq2seq LMs, 15%-masked loss
for masked LMs, random labels for classifiers, random boxes for DETR, random masks for SegFormer, CLIP's
contrastive loss); MSE of the first output to a random target for a model that returns no loss.
Each model is written with `save_pretrained` as OUT/<arch>/sweep/<name>/ (the `org/name` layout
`index recover` reads), with OUT/<arch>/hub.json (upload times, parents before children, the stranger
interleaved) and OUT/<arch>/truth.csv (`parent,child`). Then `index recover OUT/<arch> --json` runs as a
subprocess and each model's recovered parent is compared with the truth. Any exception (building,
training, saving) or a nonzero exit of the recovery is recorded per architecture, never fatal.

With --onnx-copies each model of an encoder-decoder (t5, bart, whisper) is also written as optimum's ONNX export
(`<name>-onnx`: encoder_model.onnx with decoder_model.onnx, or decoder_model_merged.onnx every other model),
uploaded after every model: each must be a `duplicate` of its source.

With --bare-base the base is written as its bare backbone (`model.base_model`: the `XModel` without a head,
its names without the task model's `base_model_prefix`), as facebook/dinov2-base and many other bases are
published, and its fine-tunes as task models.

Run (about 10 minutes for every architecture on 2 busy cores):

    nice .venv/bin/python bench/arch_sweep.py                      # every architecture
    nice .venv/bin/python bench/arch_sweep.py --arch gpt2,llama    # a subset
    nice .venv/bin/python bench/arch_sweep.py --out /tmp/arch_sweep --json /tmp/arch_sweep/result.json

Prints one table row per architecture: models read (ok rows of the recovery / models written), edges
right / true edges, roots right (base and stranger recovered as roots), edges right when recovered again
with --no-time (direction from the weights alone), seconds, the first line of any error; then the wrong
edges and failed rows in full.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
INDEX = ROOT / ".venv" / "bin" / "index"
ORG = "sweep"
V = 128  # vocabulary
SEQ = 16
BATCH = 4
BASE_STEPS, FT_STEPS, LR = 30, 20, 1e-3

# name -> (parent, init seed, data seed, steps); parents before children
FAMILY: dict[str, tuple[str | None, int, int, int]] = {
    "base": (None, 0, 100, BASE_STEPS),
    "stranger": (None, 1, 101, BASE_STEPS),
    "ft1": ("base", 0, 200, FT_STEPS),
    "ft2": ("base", 0, 300, FT_STEPS),
    "ft1-ft": ("ft1", 0, 400, FT_STEPS),
}
BARE_BASE = False  # --bare-base: the base saved as its bare backbone, its fine-tunes as task models
ONNX_COPIES = False  # --onnx-copies: an encoder-decoder's models each re-published as optimum's ONNX export
SEQ2SEQ = ("t5", "bart", "whisper")  # the encoder-decoders indexer.zoo.onnx_export.write_seq2seq_onnx exports
# upload order (hours after T0): the stranger interleaved between the base and its fine-tunes
UPLOAD_HOURS = {"base": 0, "stranger": 1, "ft1": 2, "ft2": 3, "ft1-ft": 4}


# --- architectures -----------------------------------------------------------------------------------

Batch = dict[str, Any]


def _tokens(g: torch.Generator, vocab: int = V, n: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(3, vocab, (n, seq), generator=g)


def lm_batch(g: torch.Generator) -> Batch:
    ids = _tokens(g)
    return {"input_ids": ids, "labels": ids.clone()}


MASK = 3  # the masked LMs' mask token id (random tokens are drawn from 4..V-1)


def mlm_batch(g: torch.Generator) -> Batch:
    """BERT-style masking: 15% of positions masked, the loss on those only. (Labels = input_ids on every
    position would be a copy task, the same for every data seed: siblings' deltas then point the same way,
    cosine ~0.8, and ft2 is nearer ft1 than base -- a property of that data, not of the recovery.)"""
    ids = torch.randint(MASK + 1, V, (BATCH, SEQ), generator=g)
    masked = torch.rand(BATCH, SEQ, generator=g) < 0.15
    masked[:, 0] = True  # at least one per row
    return {"input_ids": ids.masked_fill(masked, MASK), "labels": ids.masked_fill(~masked, -100)}


def cls_batch(n_labels: int = 3) -> Callable[[torch.Generator], Batch]:
    def make(g: torch.Generator) -> Batch:
        return {"input_ids": _tokens(g), "labels": torch.randint(0, n_labels, (BATCH,), generator=g)}
    return make


def seq2seq_batch(g: torch.Generator) -> Batch:
    return {"input_ids": _tokens(g), "labels": _tokens(g, seq=8)}


def image_cls_batch(size: int, n_labels: int = 3) -> Callable[[torch.Generator], Batch]:
    def make(g: torch.Generator) -> Batch:
        return {"pixel_values": torch.randn(BATCH, 3, size, size, generator=g),
                "labels": torch.randint(0, n_labels, (BATCH,), generator=g)}
    return make


def whisper_batch(g: torch.Generator) -> Batch:
    return {"input_features": torch.randn(BATCH, 16, 32, generator=g), "labels": _tokens(g, seq=8)}


def clip_batch(g: torch.Generator) -> Batch:
    return {"input_ids": _tokens(g), "pixel_values": torch.randn(BATCH, 3, 16, 16, generator=g), "return_loss": True}


def detr_batch(g: torch.Generator) -> Batch:
    labels = []
    for _ in range(2):
        centre = torch.rand(2, 2, generator=g) * 0.5 + 0.25
        wh = torch.rand(2, 2, generator=g) * 0.2 + 0.1
        labels.append({"class_labels": torch.randint(0, 3, (2,), generator=g), "boxes": torch.cat([centre, wh], 1)})
    return {"pixel_values": torch.randn(2, 3, 64, 64, generator=g), "labels": labels}


def segformer_batch(g: torch.Generator) -> Batch:
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g), "labels": torch.randint(0, 3, (2, 32, 32), generator=g)}


def audio_cls_batch(g: torch.Generator) -> Batch:
    return {"input_values": torch.randn(BATCH, 800, generator=g), "labels": torch.randint(0, 3, (BATCH,), generator=g)}


@dataclass(frozen=True)
class Arch:
    cls: str  # transformers class name
    config: str  # transformers config class name
    kwargs: dict[str, Any]
    batch: Callable[[torch.Generator], Batch]
    extra: Callable[[], dict[str, Any]] = field(default=lambda: {})  # config kwargs built lazily (nested configs)


_TXT = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, pad_token_id=0)
_DEC = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_S2S = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)


def _clip_extra() -> dict[str, Any]:
    return {"text_config": dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2),
            "vision_config": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  image_size=16, patch_size=4),
            "projection_dim": 16}


def _detr_extra() -> dict[str, Any]:
    from transformers import ResNetConfig
    return {"backbone_config": ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1],
                                            layer_type="basic", out_features=["stage4"])}


ARCHS: dict[str, Arch] = {
    "bert": Arch("BertForSequenceClassification", "BertConfig", dict(_TXT, num_labels=3), cls_batch()),
    "roberta": Arch("RobertaForMaskedLM", "RobertaConfig", dict(_TXT, pad_token_id=1, max_position_embeddings=66),
                    mlm_batch),
    "distilbert": Arch("DistilBertForSequenceClassification", "DistilBertConfig",
                       dict(vocab_size=V, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64,
                            num_labels=3), cls_batch()),
    "albert": Arch("AlbertForMaskedLM", "AlbertConfig", dict(_TXT, embedding_size=16), mlm_batch),
    "electra": Arch("ElectraForSequenceClassification", "ElectraConfig", dict(_TXT, embedding_size=16, num_labels=3),
                    cls_batch()),
    "deberta-v2": Arch("DebertaV2ForSequenceClassification", "DebertaV2Config",
                       dict(_TXT, num_labels=3, relative_attention=True, position_buckets=8,
                            pos_att_type=["p2c", "c2p"]), cls_batch()),
    "t5": Arch("T5ForConditionalGeneration", "T5Config",
               dict(vocab_size=V, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0), seq2seq_batch),
    "bart": Arch("BartForConditionalGeneration", "BartConfig", _S2S, seq2seq_batch),
    "gpt2": Arch("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1,
                      eos_token_id=2),
                 lm_batch),
    "gpt_neox": Arch("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(_TXT), lm_batch),
    "opt": Arch("OPTForSequenceClassification", "OPTConfig",
                dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                     word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=0, num_labels=3), cls_batch()),
    "bloom": Arch("BloomForCausalLM", "BloomConfig", dict(vocab_size=V, hidden_size=32, n_layer=2, n_head=2), lm_batch),
    "falcon": Arch("FalconForCausalLM", "FalconConfig",
                   dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2), lm_batch),
    "llama": Arch("LlamaForCausalLM", "LlamaConfig", dict(_DEC), lm_batch),
    "mistral": Arch("MistralForCausalLM", "MistralConfig", dict(_DEC), lm_batch),
    "qwen2": Arch("Qwen2ForSequenceClassification", "Qwen2Config", dict(_DEC, num_labels=3), cls_batch()),
    "gemma": Arch("GemmaForCausalLM", "GemmaConfig", dict(_DEC, head_dim=16), lm_batch),
    "gemma2": Arch("Gemma2ForCausalLM", "Gemma2Config",
                   dict(_DEC, head_dim=16, query_pre_attn_scalar=16, sliding_window=8), lm_batch),
    "phi": Arch("PhiForCausalLM", "PhiConfig", dict(_DEC), lm_batch),
    "phi3": Arch("Phi3ForCausalLM", "Phi3Config", dict(_DEC), lm_batch),
    "mamba": Arch("MambaForCausalLM", "MambaConfig",
                  dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4),
                  lm_batch),
    "whisper": Arch("WhisperForConditionalGeneration", "WhisperConfig",
                    dict(_S2S, num_mel_bins=16, max_source_positions=16, max_target_positions=32,
                         suppress_tokens=[], begin_suppress_tokens=[]), whisper_batch),
    "clip": Arch("CLIPModel", "CLIPConfig", {}, clip_batch, _clip_extra),
    "vit": Arch("ViTForImageClassification", "ViTConfig",
                dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
                     patch_size=4, num_labels=3), image_cls_batch(16)),
    "swin": Arch("SwinForImageClassification", "SwinConfig",
                 dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
                      num_labels=3), image_cls_batch(32)),
    "convnext": Arch("ConvNextForImageClassification", "ConvNextConfig",
                     dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=3), image_cls_batch(32)),
    "resnet": Arch("ResNetForImageClassification", "ResNetConfig",
                   dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=3),
                   image_cls_batch(32)),
    "detr": Arch("DetrForObjectDetection", "DetrConfig",
                 dict(use_timm_backbone=False, use_pretrained_backbone=False, d_model=32, encoder_layers=2,
                      decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                      decoder_ffn_dim=64, num_queries=5, num_labels=3), detr_batch, _detr_extra),
    "segformer": Arch("SegformerForSemanticSegmentation", "SegformerConfig",
                      dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                           patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                           decoder_hidden_size=32, num_labels=3), segformer_batch),
    "wav2vec2": Arch("Wav2Vec2ForSequenceClassification", "Wav2Vec2Config",
                     dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                          num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, classifier_proj_size=16,
                          num_labels=3, apply_spec_augment=False), audio_cls_batch),
    "dinov2": Arch("Dinov2ForImageClassification", "Dinov2Config",
                   dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        image_size=16, patch_size=4, num_labels=3), image_cls_batch(16)),
    "hubert": Arch("HubertForSequenceClassification", "HubertConfig",
                   dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, classifier_proj_size=16,
                        num_labels=3, apply_spec_augment=False), audio_cls_batch),
    "mixtral": Arch("MixtralForCausalLM", "MixtralConfig", dict(_DEC, num_local_experts=4, num_experts_per_tok=2),
                    lm_batch),
}


# --- building a family -----------------------------------------------------------------------------


def build_model(arch: Arch) -> torch.nn.Module:
    import transformers

    config = getattr(transformers, arch.config)(**arch.kwargs, **arch.extra())
    return getattr(transformers, arch.cls)(config)


def _loss(model: torch.nn.Module, batch: Batch, g: torch.Generator) -> torch.Tensor:
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is not None:
        return loss
    first = out[0] if isinstance(out, tuple) else next(v for v in out.values() if isinstance(v, torch.Tensor))
    return torch.nn.functional.mse_loss(first, torch.randn(first.shape, generator=g))


def train(model: torch.nn.Module, arch: Arch, data_seed: int, steps: int) -> float:
    g = torch.Generator().manual_seed(data_seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(model, arch.batch(g), g)
        loss.backward()
        opt.step()
    return float(loss.detach())


def save(model: torch.nn.Module, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(folder, safe_serialization=True)
    except TypeError:  # a transformers without the keyword (safetensors is the default there)
        model.save_pretrained(folder)
    if not any(folder.glob("*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no *.safetensors in {folder}: {sorted(os.listdir(folder))}")


def write_family(name: str, arch: Arch, out: Path) -> dict[str, str | None]:
    """Train and write the five models, hub.json and truth.csv; returns repo_id -> true parent id."""
    models: dict[str, torch.nn.Module] = {}
    truth: dict[str, str | None] = {}
    for model_name, (parent, init_seed, data_seed, steps) in FAMILY.items():
        if parent is None:
            torch.manual_seed(init_seed)
            model = build_model(arch)
        else:
            model = build_model(arch)
            model.load_state_dict(models[parent].state_dict())
        train(model, arch, data_seed, steps)
        models[model_name] = model
        if ONNX_COPIES and name in SEQ2SEQ:
            from indexer.zoo.onnx_export import write_seq2seq_onnx

            # optimum's layout (encoder + decoder graphs), the merged decoder for every other model
            write_seq2seq_onnx(out / ORG / f"{model_name}-onnx", copy.deepcopy(model),
                               merged=list(FAMILY).index(model_name) % 2 == 1)
            truth[f"{ORG}/{model_name}-onnx"] = f"{ORG}/{model_name}"
        bare = BARE_BASE and model_name == "base" and model.base_model is not model
        # the bare backbone (`XModel`, no head, no prefix), as facebook/dinov2-base is published
        save(model.base_model if bare else model, out / ORG / model_name)
        truth[f"{ORG}/{model_name}"] = f"{ORG}/{parent}" if parent else None
    t0 = time.mktime((2024, 1, 2, 3, 4, 5, 0, 0, 0))
    hours = dict(UPLOAD_HOURS)
    if ONNX_COPIES and name in SEQ2SEQ:  # each export uploaded after every model: after its source
        hours |= {f"{m}-onnx": 10 + h for m, h in UPLOAD_HOURS.items()}
    stamps = {f"{ORG}/{m}": {"createdAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t0 + 3600 * h)),
                             "gated": False, "private": False} for m, h in hours.items()}
    (out / "hub.json").write_text(json.dumps({"version": 1, "repos": stamps}, indent=2, sort_keys=True) + "\n")
    with (out / "truth.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["parent", "child"])
        for child in sorted(truth):
            writer.writerow([truth[child] or "", child])
    return truth


# --- recovery and scoring --------------------------------------------------------------------------


@dataclass
class Result:
    arch: str
    written: int = 0
    read: int = 0
    edges_right: int = 0
    edges_right_no_time: int = -1  # the same, recovered without hub.json upload times (-1: not run)
    edges: int = 0
    roots_right: int = 0
    roots: int = 0
    errors: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    wrong_no_time: list[str] = field(default_factory=list)
    seconds: float = 0.0


def recover(folder: Path, timeout: float, *, use_time: bool = True) -> tuple[list[dict[str, Any]] | None, str]:
    """Rows of `index recover FOLDER --json`, or None and the error text."""
    cmd = [str(INDEX), "recover", str(folder), "--json", "--device", "cpu"] + ([] if use_time else ["--no-time"])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"index recover timed out after {timeout:.0f} s"
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        return None, f"index recover exit {proc.returncode}: " + " | ".join(tail[-6:])
    try:
        return json.loads(proc.stdout), proc.stderr.strip()
    except json.JSONDecodeError as exc:
        return None, f"index recover printed no JSON ({exc}): {proc.stdout[:300]!r}"


def score(res: Result, truth: dict[str, str | None], rows: list[dict[str, Any]]) -> None:
    by_id = {r["repo_id"]: r for r in rows}
    for child, parent in sorted(truth.items()):
        row = by_id.get(child)
        if row is None:
            res.errors.append(f"{child}: no row in the recovery")
            continue
        if row["status"] != "ok":
            res.errors.append(f"{child}: failed: {row['reason']}")
            continue
        res.read += 1
        got = row["parent"] or None
        if parent is None:
            res.roots += 1
            if got is None:
                res.roots_right += 1
            else:
                res.wrong.append(f"{child}: got {got} ({row['relation']}), true root")
        else:
            res.edges += 1
            if got == parent and (not child.endswith("-onnx") or row["relation"] == "duplicate"):
                res.edges_right += 1
            else:
                res.wrong.append(f"{child}: got {got or 'root'}"
                                 f"{' (' + row['relation'] + ')' if got else ''}, true {parent}")
    res.roots = sum(1 for p in truth.values() if p is None)
    res.edges = sum(1 for p in truth.values() if p is not None)
    extra = sorted(set(by_id) - set(truth))
    if extra:
        res.errors.append(f"rows for repos not written: {', '.join(extra)}")


def run_arch(name: str, out: Path, timeout: float) -> Result:
    res = Result(name)
    start = time.perf_counter()
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    try:
        truth = write_family(name, ARCHS[name], folder)
        res.written = len(truth)
    except Exception as exc:  # noqa: BLE001 -- a sweep records every failure and goes on
        last = traceback.extract_tb(exc.__traceback__)[-1]
        res.errors.append(f"build/train/save: {type(exc).__name__}: {exc} [{Path(last.filename).name}:{last.lineno}]")
        res.seconds = time.perf_counter() - start
        return res
    rows, err = recover(folder, timeout)
    if rows is None:
        res.errors.append(err)
    else:
        score(res, truth, rows)
        warnings = [ln for ln in err.splitlines() if "warn" in ln.lower() or "error" in ln.lower()]
        res.errors += [f"stderr: {w}" for w in warnings[:3]]
    rows, err = recover(folder, timeout, use_time=False)
    if rows is None:
        res.errors.append(f"--no-time: {err}")
    else:
        by_id = {r["repo_id"]: r for r in rows}
        res.edges_right_no_time = 0
        for child, parent in sorted(truth.items()):
            row = by_id.get(child, {"status": "missing", "parent": ""})
            got = (row["parent"] or None) if row["status"] == "ok" else "(failed)"
            if parent is not None and got == parent:
                res.edges_right_no_time += 1
            elif got != parent:
                res.wrong_no_time.append(f"{child}: got {got or 'root'}, true {parent or 'root'}")
    res.seconds = time.perf_counter() - start
    return res


def table(results: list[Result]) -> str:
    lines = [f"{'arch':<11} | {'read':>5} | {'edges':>5} | {'roots':>5} | {'no-time':>7} | {'s':>4} | errors (first line)",
             "-" * 100]
    for r in results:
        first = r.errors[0].splitlines()[0][:160] if r.errors else ""
        read = f"{r.read}/{r.written}" if r.written else "-"
        edges = f"{r.edges_right}/{r.edges}" if r.written else "-"
        roots = f"{r.roots_right}/{r.roots}" if r.written else "-"
        no_time = f"{r.edges_right_no_time}/{r.edges}" if r.edges_right_no_time >= 0 else "-"
        lines.append(f"{r.arch:<11} | {read:>5} | {edges:>5} | {roots:>5} | {no_time:>7} | {r.seconds:>4.0f} | {first}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default=",".join(ARCHS), help="comma-separated subset of: " + ", ".join(ARCHS))
    ap.add_argument("--out", type=Path, default=Path("/tmp/arch_sweep"), help="scratch folder (one subfolder per arch)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds for one `index recover` run")
    ap.add_argument("--base-steps", type=int, default=BASE_STEPS,
                    help=f"Adam steps of the base and the stranger (default {BASE_STEPS}; a longer pre-training "
                         "makes a root more like the Hub's)")
    ap.add_argument("--bare-base", action="store_true",
                    help="save the base as its bare backbone (XModel: no head, names without the task model's "
                         "prefix) and its fine-tunes as task models, as many bases are published")
    ap.add_argument("--onnx-copies", action="store_true",
                    help=f"re-publish every model of {', '.join(SEQ2SEQ)} as optimum's ONNX export (encoder_model.onnx "
                         "+ decoder_model[_merged].onnx), uploaded last: each must be a duplicate of its source")
    args = ap.parse_args()
    global BARE_BASE, ONNX_COPIES
    BARE_BASE, ONNX_COPIES = args.bare_base, args.onnx_copies
    for model_name, (parent, init_seed, data_seed, _) in list(FAMILY.items()):
        if parent is None:
            FAMILY[model_name] = (parent, init_seed, data_seed, args.base_steps)
    names = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in names if a not in ARCHS]
    if unknown:
        ap.error(f"unknown arch {', '.join(unknown)}; choose from {', '.join(ARCHS)}")
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        r = run_arch(name, args.out, args.timeout)
        results.append(r)
        status = "ok" if not r.errors and not r.wrong and r.written else "PROBLEM"
        print(f"[{name}] {status} in {r.seconds:.0f} s", file=sys.stderr, flush=True)
    print(table(results))
    for r in results:
        if r.errors or r.wrong or r.wrong_no_time:
            print(f"\n== {r.arch}")
            for line in r.wrong:
                print(f"  wrong: {line}")
            for line in r.wrong_no_time:
                print(f"  wrong without upload times (--no-time): {line}")
            for line in r.errors:
                print(f"  error: {line}")
    if args.json is not None:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
