"""The DoRA magnitude test (`sketches.adapter.magnitude_fit`): its false positive rate on unrelated bases
of the same shapes, and its power on the trained-on base and a fine-tune of it, by how far training moved
the magnitudes.

Real `peft` DoRA adapters (r = 8 on every linear layer of the blocks) on small Llama-shaped models (hidden 128, 4 layers), trained
with AdamW for STEPS steps at each learning rate on a random token stream. Two kinds of base: fresh from
initialisation (rows of nearly one norm: the hard case, the magnitudes' drift is set against a 6 % spread
between rows) and "pre-trained" (300 steps at lr 3e-3 first: rows of unequal norms, as trained models
have). Each adapter is tested, reading 8 weights x 32 rows as the crawl does (`magnitude_rows`), against
its own base, a fine-tune of it, and every other base of its kind (the null: trained independently).

    .venv/bin/python bench/dora.py --seeds 5
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.relations.adapters import decisive, magnitude_rows  # noqa: E402
from sketches.adapter import check_compatibility, lora_updates, magnitude_fit, parse_adapter_config  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 60
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def model(seed: int):  # noqa: ANN201 -- transformers' class, imported late
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))


def train(m: torch.nn.Module, seed: int, steps: int, lr: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 128, (8, 32), generator=gen)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = m(input_ids=tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def state(m: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}


def base(seed: int, pretrained: bool) -> dict[str, np.ndarray]:
    m = model(seed)
    if pretrained:
        train(m, 1000 + seed, 300, 3e-3)
    return state(m)


def dora_updates(weights: dict[str, np.ndarray], seed: int, lr: float) -> dict:
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    m = model(0)
    m.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        peft_model = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, use_dora=True, lora_dropout=0.0))
        train(peft_model, seed, STEPS, lr)
    saved = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(peft_model).items()}
    config = parse_adapter_config(b'{"base_model_name_or_path": "x", "r": 8, "lora_alpha": 16, "use_dora": true}')
    return lora_updates(config, saved)


def tested(updates: dict, weights: dict[str, np.ndarray]):  # noqa: ANN201
    shapes = {n: tuple(a.shape) for n, a in weights.items()}
    compat = check_compatibility(updates, {}, shapes)
    wanted = magnitude_rows(updates, compat)
    return magnitude_fit(updates, {n: weights[n][:k] for n, k in wanted.items()}, compat.base_names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    started = time.perf_counter()
    rows: dict[tuple[str, float, str], list] = defaultdict(list)
    for pretrained in (False, True):
        kind = "pre-trained" if pretrained else "fresh"
        bases = {s: base(s, pretrained) for s in range(args.seeds)}
        tuned = {}
        for s, w in bases.items():
            m = model(0)
            m.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()})
            train(m, 2000 + s, 30, 3e-4)
            tuned[s] = state(m)
        for lr in LRS:
            for s, w in bases.items():
                updates = dora_updates(w, 100 + s, lr)
                rows[(kind, lr, "own base")].append(tested(updates, w))
                rows[(kind, lr, "fine-tune of base")].append(tested(updates, tuned[s]))
                for other, v in bases.items():
                    if other != s:
                        rows[(kind, lr, "unrelated")].append(tested(updates, v))
    print("| base kind | DoRA lr | tested against | pairs | median drift | median Z | related | decisive |")
    print("|---|---|---|---|---|---|---|---|")
    for (kind, lr, against), fits in rows.items():
        drift = np.median([f.median_relative_error for f in fits])
        z = np.median([f.score for f in fits])
        related = sum(f.related for f in fits)
        print(f"| {kind} | {lr:g} | {against} | {len(fits)} | {drift:.3f} | {z:.2f} | {related}/{len(fits)} | "
              f"{sum(decisive(f) for f in fits)}/{len(fits)} |")
    null = [f for (_, _, against), fits in rows.items() if against == "unrelated" for f in fits]
    print(f"\nfalse positives on unrelated bases: {sum(f.related for f in null)}/{len(null)}; "
          f"their Z: mean {np.mean([f.score for f in null]):.2f}, sd {np.std([f.score for f in null]):.2f} "
          "(the null's N(0, 1): mean 0, sd 1)")
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
