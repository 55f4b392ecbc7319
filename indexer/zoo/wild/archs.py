"""The three architectures of the wild zoo, with the tensor names and dtypes their libraries write.

- conv: a ResNet-shaped net with BatchNorm (torchvision / timm names: `conv1.weight`, `bn1.*` with
  `running_mean`, `running_var`, `num_batches_tracked`, `layer1.0.conv1.weight`, `layer2.0.downsample.0`,
  `fc.weight`); widths 32-64-128-256, one BasicBlock per stage, 8x8 grey images (1.2 M parameters).
  The extra-layer transfer replaces `fc` by `fc = Sequential(Linear, BatchNorm1d, ReLU, Linear)`, the
  usual torchvision recipe, so its head is `fc.0.*`, `fc.1.*` (a new BatchNorm), `fc.3.*`.
- bert: `transformers` BertForPreTraining (MLM + NSP: `bert.*`, `bert.pooler.*`, `cls.*`) for the
  pre-trained models, BertForSequenceClassification (`bert.*`, `classifier.*`) for the task models;
  hidden 64, 4 layers, 4 heads, intermediate 256, 96 tokens, 64 positions.
- gpt2: `transformers` GPT2LMHeadModel (`transformer.*`; `lm_head` is tied to `wte` and not written) and
  GPT2ForSequenceClassification (`transformer.*`, `score.weight`); n_embd 64, 4 layers, 4 heads.

What a file holds is what `save_pretrained` writes (the state dict less the tied copies) plus the
buffers that the transformers versions before 4.31 also wrote and that most Hub files of these
families still carry: BERT's `bert.embeddings.position_ids` (int64) and GPT-2's causal masks
`transformer.h.N.attn.bias` (float32 [1, 1, 64, 64], as in the `gpt2` repo). Those, and the conv
net's `num_batches_tracked`, are what the "no buffer" re-save drops.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from indexer.zoo.data import IMAGE_SIZE
from indexer.zoo.wild.data import CLS, PAD, SEP, VOCAB

logger = logging.getLogger(__name__)

ArchName = Literal["conv", "bert", "gpt2"]
Head = Literal["classify", "classify-extra", "pretrain", "lm"]
Tensors = dict[str, torch.Tensor]

WIDTHS = (32, 64, 128, 256)
EXTRA_WIDTH = 64
HIDDEN = 64
LAYERS = 4
HEADS = 4
INTERMEDIATE = 256
POSITIONS = 64  # >= data.SEQ_LEN (32); also the side of GPT-2's stored causal mask

# Buffers: saved by some library versions and not others, constant in unrelated models. Never part of
# the drift, and what a "no buffer" re-save drops.
_BUFFER_SUFFIXES = (".num_batches_tracked", ".position_ids", ".attn.bias", ".attn.masked_bias")
_STATS_SUFFIXES = (".running_mean", ".running_var")


def is_buffer(name: str) -> bool:
    return name.endswith(_BUFFER_SUFFIXES)


# --- the conv net ------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 convs with BatchNorm, a 1x1 downsample when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class WildResNet(nn.Module):
    """conv1/bn1 stem (3x3, no max-pool: the images are 8x8), layer1-4 (strides 1, 2, 2, 2), avgpool, fc."""

    def __init__(self, n_classes: int, *, extra_layer: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)
        cin = WIDTHS[0]
        for i, (width, stride) in enumerate(zip(WIDTHS, (1, 2, 2, 2), strict=True)):
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, width, stride)))
            cin = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc: nn.Module = nn.Linear(cin, n_classes)
        if extra_layer:
            self.fc = nn.Sequential(nn.Linear(cin, EXTRA_WIDTH), nn.BatchNorm1d(EXTRA_WIDTH), nn.ReLU(inplace=True),
                                    nn.Linear(EXTRA_WIDTH, n_classes))
        self._init()

    def _init(self) -> None:
        """torchvision's ResNet init: Kaiming-normal (fan_out) convs, BatchNorm weight 1 and bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --- one class per architecture ----------------------------------------------------------------------


class Arch:
    """What the zoo needs of an architecture: build, save (names as the library writes them), load."""

    name: ArchName
    library: str  # the model card's library_name
    heads: tuple[str, ...]  # name prefixes of the task heads: re-drawn for a new task, not "body"

    def build(self, head: Head, n_classes: int, *, seed: int) -> nn.Module:
        raise NotImplementedError

    def legacy_buffers(self, model: nn.Module) -> Tensors:
        return {}

    def config(self, model: nn.Module, head: Head, n_classes: int) -> dict[str, Any]:
        raise NotImplementedError

    def rename(self, name: str) -> str:
        """The name under the other prefix of the "prefix" re-save."""
        raise NotImplementedError

    def is_head(self, name: str) -> bool:
        return name.startswith(self.heads)

    def freeze_body(self, model: nn.Module) -> None:
        """Only the head trains; the body also stays in eval mode (BatchNorm statistics frozen too)."""
        for name, p in model.named_parameters():
            p.requires_grad_(self.is_head(name))

    def body_train_mode(self, model: nn.Module, *, frozen: bool) -> None:
        model.train()
        if frozen:
            for name, module in model.named_modules():
                if name and not self.is_head(name + "."):
                    module.eval()

    def saved_tensors(self, model: nn.Module) -> Tensors:
        """The tensors `save_pretrained` / `torch.save(state_dict)` writes, plus the legacy buffers."""
        tied = getattr(model, "_tied_weights_keys", None) or {}
        state = {n: t.detach().contiguous().clone() for n, t in model.state_dict().items() if n not in tied}
        return state | self.legacy_buffers(model)

    def load(self, model: nn.Module, tensors: Tensors, *, keep_head: bool) -> None:
        """Load a parent's tensors; a head is taken only with `keep_head` and when its shape fits."""
        own = model.state_dict()
        take = {n: t for n, t in tensors.items()
                if n in own and own[n].shape == t.shape and (keep_head or not self.is_head(n))}
        tied = set(getattr(model, "_tied_weights_keys", None) or {})
        missing = sorted(n for n in own if n not in take and not self.is_head(n) and n not in tied)
        if missing:
            raise ValueError(f"the parent lacks body tensors {missing[:3]}...; is it of the same architecture?")
        model.load_state_dict(take, strict=False)


class ConvArch(Arch):
    name: ArchName = "conv"
    library = "timm"
    heads = ("fc.",)

    def build(self, head: Head, n_classes: int, *, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return WildResNet(n_classes, extra_layer=head == "classify-extra").eval()

    def config(self, model: nn.Module, head: Head, n_classes: int) -> dict[str, Any]:
        # a timm-style config.json: no transformers model_type, the architecture named in plain words
        return {"architecture": "resnet_wild", "num_classes": n_classes, "num_features": WIDTHS[-1],
                "in_chans": 1, "widths": list(WIDTHS), "extra_layer": head == "classify-extra",
                "pretrained_cfg": {"input_size": [1, IMAGE_SIZE, IMAGE_SIZE], "mean": [0.5], "std": [0.5]}}

    def rename(self, name: str) -> str:
        return "model." + name  # a Lightning module's `self.model`


def _hf_config_dict(model: nn.Module) -> dict[str, Any]:
    """What `save_pretrained` writes to config.json: the non-default fields, the class in `architectures`."""
    model.config.architectures = [type(model).__name__]
    return dict(json.loads(model.config.to_json_string(use_diff=True)))


class BertArch(Arch):
    name: ArchName = "bert"
    library = "transformers"
    heads = ("cls.", "classifier.")

    def _config(self, n_classes: int) -> Any:
        from transformers import BertConfig

        labels = {"num_labels": n_classes} if n_classes else {}
        return BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS, pad_token_id=PAD,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **labels)

    def build(self, head: Head, n_classes: int, *, seed: int) -> nn.Module:
        from transformers import BertForPreTraining, BertForSequenceClassification

        torch.manual_seed(seed)
        if head == "pretrain":
            return BertForPreTraining(self._config(0)).eval()
        return BertForSequenceClassification(self._config(n_classes)).eval()

    def legacy_buffers(self, model: nn.Module) -> Tensors:
        return {"bert.embeddings.position_ids": torch.arange(POSITIONS, dtype=torch.int64)[None, :].clone()}

    def config(self, model: nn.Module, head: Head, n_classes: int) -> dict[str, Any]:
        return _hf_config_dict(model)

    def rename(self, name: str) -> str:
        # sentence-transformers' module 0 (`0.auto_model.`) holds what a task model keeps under `bert.`
        return "0.auto_model." + name[len("bert."):] if name.startswith("bert.") else name


class Gpt2Arch(Arch):
    name: ArchName = "gpt2"
    library = "transformers"
    heads = ("lm_head.", "score.")

    def _config(self, n_classes: int) -> Any:
        from transformers import GPT2Config

        labels = {"num_labels": n_classes} if n_classes else {}
        # pad_token_id lets the classifier pool the last token of a batch; no sequence is ever padded
        return GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                          n_inner=INTERMEDIATE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          bos_token_id=CLS, eos_token_id=SEP, pad_token_id=PAD, **labels)

    def build(self, head: Head, n_classes: int, *, seed: int) -> nn.Module:
        from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

        torch.manual_seed(seed)
        if head == "lm":
            return GPT2LMHeadModel(self._config(0)).eval()
        return GPT2ForSequenceClassification(self._config(n_classes)).eval()

    def legacy_buffers(self, model: nn.Module) -> Tensors:
        mask = torch.tril(torch.ones(POSITIONS, POSITIONS, dtype=torch.float32)).view(1, 1, POSITIONS, POSITIONS)
        return {f"transformer.h.{i}.attn.bias": mask.clone() for i in range(LAYERS)}

    def config(self, model: nn.Module, head: Head, n_classes: int) -> dict[str, Any]:
        return _hf_config_dict(model)

    def rename(self, name: str) -> str:
        # the `gpt2` repo's own layout: GPT2Model's names, without the LM head model's `transformer.`
        return name.removeprefix("transformer.")


ARCHS: dict[str, Arch] = {a.name: a for a in (ConvArch(), BertArch(), Gpt2Arch())}


# --- comparing two checkpoints -----------------------------------------------------------------------


def body_drift(arch: Arch, parent: Tensors, child: Tensors) -> float | None:
    """Median over the body's shared weight matrices / kernels of ||child - parent|| / ||parent||.

    Matrices and kernels only (ndim >= 2): the median is about layers, and 1-D norms sitting near 1
    would pull it towards 0. Buffers and running statistics are left out (constant or not learnt);
    heads too (re-drawn per task). None when nothing is shared.
    """
    ratios = []
    for name in sorted(parent):  # deterministic
        a, b = parent[name], child.get(name)
        if b is None or a.shape != b.shape or a.ndim < 2 or not a.is_floating_point():
            continue
        if arch.is_head(name) or is_buffer(name) or name.endswith(_STATS_SUFFIXES):
            continue
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        norm = float(a64.norm())
        if norm > 0.0:
            ratios.append(float((b64 - a64).norm()) / norm)
    return float(np.median(ratios)) if ratios else None
