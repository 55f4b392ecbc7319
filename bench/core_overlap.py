"""How large is a "large common core"? Core overlaps between real `transformers` layouts.

    .venv/bin/python bench/core_overlap.py [--results bench/RESULTS.md]

Builds each architecture from its config class on the meta device (no weights, nothing downloaded),
takes its state-dict shapes under normalised names (sketches.layers), and prints the core overlap of
every pair (sketches.layers.core_overlap: the share of the smaller body's values held in tensors both
have with one name and shape), plus the same model with a resized head and with an extra block. The
rule CORE_SHARE = 0.5 should sit in the empty middle of this table.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers as tf  # noqa: E402

from sketches.layers import CORE_SHARE, core_overlap, normalise_name  # noqa: E402


def layouts() -> dict[str, dict[str, tuple[int, ...]]]:
    cfgs = {
        "bert-base (BertModel)": (tf.BertModel, tf.BertConfig()),
        "bert-base + 3-class head": (tf.BertForSequenceClassification, tf.BertConfig(num_labels=3)),
        "bert-large": (tf.BertModel, tf.BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)),
        "bert 6-layer cut": (tf.BertModel, tf.BertConfig(num_hidden_layers=6)),
        "roberta-base": (tf.RobertaModel, tf.RobertaConfig()),
        "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config()),
        "gpt2 + 5-class score": (tf.GPT2ForSequenceClassification, tf.GPT2Config(num_labels=5)),
        "gpt2-medium": (tf.GPT2LMHeadModel, tf.GPT2Config(n_embd=1024, n_layer=24, n_head=16)),
        "vit-base": (tf.ViTModel, tf.ViTConfig()),
        "resnet-50": (tf.ResNetModel, tf.ResNetConfig()),
        "resnet-18": (tf.ResNetModel, tf.ResNetConfig(depths=[2, 2, 2, 2], layer_type="basic", hidden_sizes=[64, 128, 256, 512])),
        "llama (tiny, 4 layers)": (tf.LlamaForCausalLM, tf.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, vocab_size=32000)),
    }
    out = {}
    for label, (cls, cfg) in cfgs.items():
        with torch.device("meta"):
            model = cls(cfg)
        out[label] = {normalise_name(n): tuple(t.shape) for n, t in model.state_dict().items() if t.is_floating_point()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=None)
    args = ap.parse_args()
    shapes = layouts()
    rows = sorted(((core_overlap(shapes[a], shapes[b]), a, b) for a, b in itertools.combinations(shapes, 2)), reverse=True)
    lines = ["### Core overlap between real `transformers` layouts: `.venv/bin/python bench/core_overlap.py`", "",
             "| overlap | model A | model B | one family (>= %.1f)? |" % CORE_SHARE, "|---|---|---|---|"]
    lines += [f"| {o:.3f} | {a} | {b} | {'yes' if o >= CORE_SHARE else 'no'} |" for o, a, b in rows]
    gap = [o for o, _, _ in rows]
    below = max((o for o in gap if o < CORE_SHARE), default=0.0)
    above = min((o for o in gap if o >= CORE_SHARE), default=1.0)
    lines.append(f"\nLargest overlap below the rule: {below:.3f}; smallest above it: {above:.3f}.")
    text = "\n".join(lines)
    print(text)
    if args.results:
        with args.results.open("a") as fh:
            fh.write("\n\n" + text + "\n")


if __name__ == "__main__":
    main()
