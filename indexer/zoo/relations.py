"""A relations zoo: every edge type of the Hub's model tree, made from small Llama models by the real tools.

Built on CPU in a few minutes (`make_relations_zoo`):
    bases        2 tiny LlamaForCausalLM (hidden 64, 2 layers, GQA 4/2 heads) pre-trained from scratch on
                 two synthetic token languages (a random bigram chain each), `save_pretrained` safetensors
    finetune     2 full fine-tunes of each base on other languages
    duplicate    a later byte-for-byte re-upload of a fine-tune
    adapter      `peft` LoRA adapters saved unmerged (adapter_config.json + adapter_model.safetensors), 2 on
                 one base, 1 on the other, and one adapter trained further from another (a chain)
    quantized    GGUF files from the `gguf` package's quantizers and writer (F16, Q8_0, Q4_0), in repos that
                 hold the .gguf alone (no config.json), and GPTQ v1 packed safetensors (4- and 8-bit)
                 (indexer.zoo.quantize)
    merge        `mergekit` merges (linear, SLERP, TIES, DARE-TIES) of two fine-tunes of one base
    + when `bitsandbytes` and `compressed-tensors` import (an optional extra, indexer.zoo.quantize): a
                 bitsandbytes int8 and an nf4 copy and a compressed-tensors FP8 copy, made last (the
                 models above are the same with or without them; zoo.json says why they were left out)
Each repo is `OUT/<org>/<name>/` with a card declaring `base_model` (a list for merges) and
`base_model_relation`; `OUT/hub.json` holds upload times (parents first); `OUT/truth.csv` holds
`child,parents,relation` (parents ";"-joined: the merged models for a merge, their weights in
`OUT/zoo.json`). The emulator serves the folder as it is (`index hub serve OUT`).
Deterministic given the seed: torch and numpy are seeded per model from (seed, model index).
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from errors import BadInputError
from indexer.zoo.quantize import (
    optional_quantizers,
    write_bnb,
    write_fp8,
    write_gptq,
    write_llama_gguf,
)

logger = logging.getLogger(__name__)

ORG = "rel"
VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 64, 2, 4, 2, 128
SEQ, BATCH = 32, 16
BASE_STEPS, FT_STEPS, LORA_STEPS = 300, 120, 120
LR_BASE, LR_FT, LR_LORA = 3e-3, 1e-3, 3e-3
T0 = datetime(2024, 1, 1, tzinfo=UTC)


@dataclass
class ZooModel:
    repo_id: str
    relation: str  # "" for a root
    parents: tuple[str, ...]
    weights: tuple[float, ...] = ()  # merges: each parent's weight in the recipe
    recipe: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=SEQ * 2,
                       tie_word_embeddings=False)


def language(task: int, seed: int) -> np.ndarray:
    """A synthetic token language: a random bigram transition matrix (peaked, so it is learnable)."""
    rng = np.random.default_rng([seed, task, 17])
    logits = rng.standard_normal((VOCAB, VOCAB)) * 3.0
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def batches(task: int, seed: int, steps: int, salt: int) -> list[torch.Tensor]:
    rng = np.random.default_rng([seed, task, salt])
    trans = language(task, seed)
    cum = trans.cumsum(1)
    out = []
    for _ in range(steps):
        seq = np.empty((BATCH, SEQ), dtype=np.int64)
        seq[:, 0] = rng.integers(0, VOCAB, BATCH)
        for t in range(1, SEQ):
            u = rng.random(BATCH)
            seq[:, t] = np.minimum((cum[seq[:, t - 1]] < u[:, None]).sum(1), VOCAB - 1)
        out.append(torch.from_numpy(seq))
    return out


def train(model: torch.nn.Module, task: int, seed: int, steps: int, lr: float, salt: int) -> float:
    """A few AdamW steps of next-token prediction; returns the last loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss = torch.tensor(0.0)
    model.train()
    for tokens in batches(task, seed, steps, salt):
        loss = model(input_ids=tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def _card(folder: Path, bases: tuple[str, ...], relation: str) -> None:
    if not bases:
        (folder / "README.md").write_text("---\nlicense: mit\n---\n")
        return
    base = bases[0] if len(bases) == 1 else "\n" + "\n".join(f"- {b}" for b in bases)
    (folder / "README.md").write_text(f"---\nbase_model: {base}\nbase_model_relation: {relation}\n---\n")


def _state(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(folder.glob("*.safetensors"))
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update({k: v.astype(np.float32) for k, v in load_file(str(f)).items()})
    return out


class _Builder:
    def __init__(self, out: Path, seed: int) -> None:
        self.out, self.seed = out, seed
        self.models: list[ZooModel] = []
        self.created: dict[str, datetime] = {}
        self.left_out = ""  # why the optional bnb / FP8 copies were not made ("" when they were)

    def folder(self, name: str) -> Path:
        path = self.out / ORG / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def add(self, model: ZooModel, make: Callable[[Path], dict[str, Any] | None]) -> ZooModel:
        started = time.perf_counter()
        torch.manual_seed(hash((self.seed, len(self.models))) % (2**31))
        extra = make(self.folder(model.repo_id.split("/", 1)[1])) or {}
        model.seconds, model.extra = round(time.perf_counter() - started, 2), extra
        # parents first: each model one hour after the previous one
        self.created[model.repo_id] = T0 + timedelta(hours=len(self.models))
        _card(self.out / model.repo_id, model.parents, model.relation)
        self.models.append(model)
        logger.info("%s (%s) in %.1f s", model.repo_id, model.relation or "root", model.seconds)
        return model

    def path(self, repo_id: str) -> Path:
        return self.out / repo_id


def _pretrain(b: _Builder, name: str, task: int) -> str:
    from transformers import LlamaForCausalLM

    def make(folder: Path) -> dict[str, Any]:
        model = LlamaForCausalLM(_config())
        loss = train(model, task, b.seed, BASE_STEPS, LR_BASE, salt=1)
        model.save_pretrained(folder, safe_serialization=True)
        return {"task": task, "loss": round(loss, 3)}

    return b.add(ZooModel(f"{ORG}/{name}", "", (), recipe=f"pre-train on language {task}"), make).repo_id


def _finetune(b: _Builder, name: str, parent: str, task: int) -> str:
    from transformers import LlamaForCausalLM

    def make(folder: Path) -> dict[str, Any]:
        model = LlamaForCausalLM.from_pretrained(b.path(parent))
        loss = train(model, task, b.seed, FT_STEPS, LR_FT, salt=2)
        model.save_pretrained(folder, safe_serialization=True)
        return {"task": task, "loss": round(loss, 3)}

    return b.add(ZooModel(f"{ORG}/{name}", "finetune", (parent,), recipe=f"full fine-tune on language {task}"), make).repo_id


def _duplicate(b: _Builder, name: str, parent: str) -> str:
    def make(folder: Path) -> None:
        for f in ("config.json", "model.safetensors"):
            shutil.copy2(b.path(parent) / f, folder / f)

    # the Hub has no duplicate relation: a re-upload declares its source as a fine-tune's base
    model = b.add(ZooModel(f"{ORG}/{name}", "finetune", (parent,), recipe="byte-for-byte re-upload"), make)
    model.relation = "duplicate"  # truth; the card keeps "finetune"
    return model.repo_id


def _adapter(b: _Builder, name: str, base: str, task: int, *, start: str | None = None, r: int = 8) -> str:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    def make(folder: Path) -> dict[str, Any]:
        model = LlamaForCausalLM.from_pretrained(b.path(base))
        if start is None:
            config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                task_type="CAUSAL_LM")
            peft_model = get_peft_model(model, config)
            # B = 0 at init: train the update into shape
        else:
            peft_model = PeftModel.from_pretrained(model, b.path(start), is_trainable=True)
        loss = train(peft_model, task, b.seed, LORA_STEPS, LR_LORA, salt=3 if start is None else 4)
        peft_model.save_pretrained(folder)  # unmerged: adapter_config.json + adapter_model.safetensors
        return {"task": task, "loss": round(loss, 3), "r": r}

    parent = start or base
    recipe = f"LoRA r={r} on q/v, language {task}" + (f", trained further from {start}" if start else "")
    model = b.add(ZooModel(f"{ORG}/{name}", "adapter", (parent,), recipe=recipe), make)
    if start is not None:  # the card names the base model, as peft users do; the truth is the adapter it continues
        _card(b.path(model.repo_id), (base,), "adapter")
    return model.repo_id


def _gguf(b: _Builder, name: str, parent: str, qtype: str) -> str:
    def make(folder: Path) -> dict[str, Any]:
        path = write_llama_gguf(folder / f"{name.split('/')[-1]}-{qtype}.gguf", _state(b.path(parent)), qtype,
                                heads=HEADS, kv_heads=KV_HEADS, base_model=parent)
        return {"qtype": qtype, "bytes": path.stat().st_size}

    return b.add(ZooModel(f"{ORG}/{name}", "quantized", (parent,), recipe=f"gguf {qtype}"), make).repo_id


def _gptq(b: _Builder, name: str, parent: str, bits: int) -> str:
    def make(folder: Path) -> dict[str, Any]:
        config = json.loads((b.path(parent) / "config.json").read_text())
        write_gptq(folder, _state(b.path(parent)), config, bits=bits, group=32)
        return {"bits": bits, "group_size": 32}

    return b.add(ZooModel(f"{ORG}/{name}", "quantized", (parent,), recipe=f"GPTQ v1 {bits}-bit g32 (RTN)"), make).repo_id


def _packed(b: _Builder, name: str, parent: str, kind: str) -> str:
    """A bitsandbytes (int8 / nf4) or FP8 (compressed-tensors) copy by the libraries' own quantizers."""
    def make(folder: Path) -> dict[str, Any]:
        config = json.loads((b.path(parent) / "config.json").read_text())
        if kind == "fp8":
            write_fp8(folder, _state(b.path(parent)), config)
        else:
            write_bnb(folder, _state(b.path(parent)), config, kind=kind)
        return {"kind": kind}

    recipe = {"int8": "bitsandbytes int8 (Linear8bitLt)", "nf4": "bitsandbytes nf4 (Linear4bit, double quant)",
              "fp8": "compressed-tensors float-quantized FP8 E4M3, per-channel scales"}[kind]
    return b.add(ZooModel(f"{ORG}/{name}", "quantized", (parent,), recipe=recipe), make).repo_id


def _merge(b: _Builder, name: str, method: str, models: tuple[str, str], *, base: str | None = None,
           weights: tuple[float, float] = (0.5, 0.5), params: Mapping[str, Any] | None = None) -> str:
    """A mergekit merge (its own YAML schema, run through mergekit.merge.run_merge)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    def make(folder: Path) -> dict[str, Any]:
        doc: dict[str, Any] = {"merge_method": method, "dtype": "float32"}
        if method == "slerp":
            doc |= {"base_model": str(b.path(models[0])), "models": [{"model": str(b.path(m))} for m in models],
                    "parameters": {"t": weights[1]}}
        else:
            doc["models"] = [{"model": str(b.path(m)), "parameters": {"weight": w, **dict(params or {})}}
                             for m, w in zip(models, weights, strict=True)]
            if base is not None:
                doc["base_model"] = str(b.path(base))
        tmp = folder.parent / f".{folder.name}-merge"
        shutil.rmtree(tmp, ignore_errors=True)
        run_merge(MergeConfiguration.model_validate(doc), str(tmp),
                  MergeOptions(copy_tokenizer=False, write_model_card=False, random_seed=b.seed, quiet=True))
        for f in sorted(tmp.iterdir()):
            if f.suffix in (".json", ".safetensors"):
                shutil.move(str(f), folder / f.name)
        shutil.rmtree(tmp, ignore_errors=True)
        return {"method": method, "mergekit": doc | {"models": [m for m in models]}}

    recipe = f"mergekit {method} of {' + '.join(models)}" + (f" over {base}" if base else "")
    return b.add(ZooModel(f"{ORG}/{name}", "merge", models, weights, recipe), make).repo_id


def word_tokenizer(folder: Path, vocab: int = VOCAB) -> None:
    """A word-level tokenizer of `vocab` tokens (t0, t1, ..., <unk>, <s>) saved into a model folder: the
    zoo's models are trained on token ids and need none, but mergekit-moe reads its base's tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab - 2)} | {"<unk>": vocab - 2, "<s>": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>").save_pretrained(folder)


def mergekit_moe(out: Path, base: Path, experts: tuple[Path, ...], *, dtype: str = "float32", seed: int = 0) -> None:
    """mergekit-moe's Mixtral of dense Llama / Mistral folders: attention, norms and embeddings from `base`,
    each expert the MLP of one of `experts`, routers drawn at random (gate_mode random: no forward pass, so
    the output does not depend on the CPU). mergekit writes the experts as its transformers does (5.x:
    fused mlp.experts.gate_up_proj / down_proj). The base needs a tokenizer (`word_tokenizer`)."""
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    doc = {"base_model": str(base), "gate_mode": "random", "dtype": dtype,
           "experts": [{"source_model": str(e), "positive_prompts": [f"t{i}"]} for i, e in enumerate(experts)]}
    build(MoEMergeConfig.model_validate(doc), str(out), MergeOptions(random_seed=seed, quiet=True),
          device="cpu", allow_all_same=True)


def _recipe(b: _Builder) -> None:
    """The zoo's edges, parents first (upload order = this order)."""
    a, c = _pretrain(b, "base-a", 0), _pretrain(b, "base-b", 1)
    a1, a2 = _finetune(b, "a-ft1", a, 2), _finetune(b, "a-ft2", a, 3)
    c1, c2 = _finetune(b, "b-ft1", c, 4), _finetune(b, "b-ft2", c, 5)
    _finetune(b, "a-ft1-ft", a1, 6)
    _duplicate(b, "a-ft1-copy", a1)
    lora1 = _adapter(b, "a-lora1", a, 6)
    _adapter(b, "a-lora2", a, 7, r=4)
    _adapter(b, "a-lora1-more", a, 8, start=lora1)
    _adapter(b, "b-lora1", c, 2)
    _gguf(b, "a-ft1-Q8_0-GGUF", a1, "Q8_0")
    _gguf(b, "base-b-F16-GGUF", c, "F16")
    _gguf(b, "b-ft1-Q4_0-GGUF", c1, "Q4_0")
    _gptq(b, "a-ft2-GPTQ-4bit", a2, 4)
    _gptq(b, "base-a-GPTQ-8bit", a, 8)
    _merge(b, "a-linear", "linear", (a1, a2), weights=(0.5, 0.5))
    _merge(b, "b-slerp", "slerp", (c1, c2), weights=(0.7, 0.3))
    _merge(b, "a-ties", "ties", (a1, a2), base=a, weights=(0.6, 0.4), params={"density": 0.5})
    _merge(b, "b-dare", "dare_ties", (c1, c2), base=c, weights=(0.5, 0.5), params={"density": 0.6})
    # last, so that every model above keeps its seed and upload time whether or not these are made
    b.left_out = optional_quantizers()
    if b.left_out:
        logger.warning("bitsandbytes / compressed-tensors do not import (%s): no bnb or FP8 copies", b.left_out)
        return
    _packed(b, "a-ft1-bnb-8bit", a1, "int8")
    _packed(b, "b-ft2-bnb-nf4", c2, "nf4")
    _packed(b, "base-a-FP8", a, "fp8")


@dataclass(frozen=True)
class RelationsZoo:
    out: Path
    models: tuple[ZooModel, ...]
    seconds: float


def make_relations_zoo(out: Path, *, seed: int = 0, force: bool = False) -> RelationsZoo:
    """Build the zoo under `out` (module docstring); refuses a non-empty folder unless `force`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise BadInputError(str(out), "is not empty; pass force=True (--force) to rebuild the zoo there")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    builder = _Builder(out, seed)
    _recipe(builder)
    _declare_bases(builder)
    _write_index(builder)
    return RelationsZoo(out, tuple(builder.models), time.perf_counter() - started)


def _declare_bases(b: _Builder) -> None:
    """peft writes the base's local path into adapter_config.json; a Hub upload names the base repo. Done
    last: peft resolves the declared base while it saves a continued adapter, and a repo id would send
    it to the network."""
    for m in b.models:
        cfg_path = b.path(m.repo_id) / "adapter_config.json"
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
            local = Path(cfg["base_model_name_or_path"]).resolve()
            if local.is_relative_to(b.out.resolve()):
                cfg["base_model_name_or_path"] = local.relative_to(b.out.resolve()).as_posix()
                cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _write_index(b: _Builder) -> None:
    repos = {r: {"createdAt": t.strftime("%Y-%m-%dT%H:%M:%S.000Z")} for r, t in sorted(b.created.items())}
    (b.out / "hub.json").write_text(json.dumps({"version": 1, "repos": repos}, indent=1, sort_keys=True))
    with open(b.out / "truth.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["child", "parents", "relation"])
        for m in b.models:
            writer.writerow([m.repo_id, ";".join(m.parents), m.relation])
    (b.out / "zoo.json").write_text(json.dumps({"seed": b.seed, "models": [asdict(m) for m in b.models],
                                                "bnb_fp8_left_out": b.left_out},
                                               indent=1, sort_keys=True, default=str))


def read_truth(out: Path) -> dict[str, tuple[tuple[str, ...], str]]:
    """child -> (parents, relation) from OUT/truth.csv."""
    with open(Path(out) / "truth.csv", newline="") as fh:
        return {row["child"]: (tuple(p for p in row["parents"].split(";") if p), row["relation"])
                for row in csv.DictReader(fh)}
