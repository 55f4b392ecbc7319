"""Wild zoo presets: small conv nets, BERTs and GPT-2s, really trained, in forests that show what real Hub
families show (frozen-backbone transfer, long high-lr fine-tunes, continued pre-training, checkpoint
chains, re-saves under other names, dtype copies, byte-identical duplicates, unrelated strangers).

`make_wild_zoo` builds one (`index zoo make --preset wild-conv|wild-bert|wild-gpt2|wild-tiny`); the output
layout is the ViT zoo's, with truth.csv carrying a third column, `relation`.
"""

from indexer.zoo.wild.build import WildSummary, make_wild_zoo
from indexer.zoo.wild.layout import WILD_ORDER, WILD_PRESETS, layout

__all__ = ["WILD_ORDER", "WILD_PRESETS", "WildSummary", "layout", "make_wild_zoo"]
