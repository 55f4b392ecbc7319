"""Accuracy per byte at 7B scale: edge accuracy of lineage recovered from what a read plan reads of
virtual Llama-2-7B families, per budget and per plan (issue 14).

Families: `--families` roots of the `llama-2-7b` layout (13.5 GB of BF16 each, never materialised), each
with `--per-family` - 1 descendants in two generations (3 children of the root, the rest spread over
them as grandchildren). Each step's kind and size are drawn from one seeded Generator:

    kind       share  delta (RMS update / 0.02, log-uniform)   why
    full       0.35   [1e-3, 1e-2]    small-ft edges: rel median 1.4e-3, p90 7.9e-3 (bench/update_stats.py)
    lora-qv    0.15   [2e-3, 2e-2]    q/v only; rel of the touched matrices (made pair: see RESULTS.md)
    lora-all   0.10   [2e-3, 2e-2]    every linear matrix, rank 16
    continued  0.15   [1e-2, 5e-2]    continued pre-training: longer, broader (made pair, wild zoos 0.02-0.1)
    subres     0.25   [2e-4, 6e-4]    most |dW| below half a BF16 ulp: 85-95 % of weights bit-identical

Upload times: a child 1-30 days after its parent (the Hub: parent first in 99.73 % of edges).

Reads: every model is served by the emulator's generator (`VirtualRepo`) behind a `RepoFiles` that
reads by byte range, and read exactly as the crawler reads it (`indexer.crawl.read_headers`,
`sketches.plan.plan_reads`, `indexer.crawl.read_planned`): the cost is the planned blocks, not 13 GB.
Lineage: batch `mother` (`indexer.lineage.methods.recover_family`) on the planned arrays of one family,
assembled as batch recovery assembles a folder (see `family_accuracy`), scored against the true edges.
Families are recovered one at a time (memory: 10 models x 64 MiB of BF16 are 1.3 GB as float32), so the
figure is edge accuracy given the family.

    .venv/bin/python bench/budget_7b.py [--families 5] [--per-family 10] [--mib 64,16,4,1]
        [--plans v2,out-tall] [--reference ref-256]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from indexer.crawl import read_headers, read_planned
from indexer.hub_emulator.virtual import (
    LAYOUTS,
    Lineage,
    StepKind,
    VirtualRepo,
    set_block_cache,
)
from indexer.lineage.methods import Family, Options, recover_family
from indexer.sources import ModelEntry
from sketches.layers import canonical_tensors, family_key, select_layers
from sketches.plan import (
    OUTPUT_PROJECTIONS,
    PLAN_V2,
    VALUE_PROJECTIONS,
    PlanSpec,
    ReadPlan,
    plan_reads,
)
from sketches.safetensors import ByteSource, CallableSource
from sketches.stats import model_stats

MIB = 1024 * 1024
INDEX_FILE = "model.safetensors.index.json"
KIND_SHARE: dict[StepKind, float] = {"full": 0.35, "lora-qv": 0.15, "lora-all": 0.10, "continued": 0.15, "subres": 0.25}
DELTA_RANGE: dict[StepKind, tuple[float, float]] = {
    "full": (1e-3, 1e-2), "lora-qv": (2e-3, 2e-2), "lora-all": (2e-3, 2e-2), "continued": (1e-2, 5e-2),
    "subres": (2e-4, 6e-4),
}
_LINEAR = r"(?:^|\.)(?:[qkvo]_proj|gate_proj|up_proj|down_proj)\.weight$"
_ROWS_256 = 256 * 4096  # elements of 256 rows of a 4096-wide matrix
PLANS: dict[str, PlanSpec] = {
    "v2": PLAN_V2,  # first rows of all 128 attention matrices, >= 64 KiB blocks
    "out": PlanSpec(OUTPUT_PROJECTIONS),  # first rows of o_proj + down_proj, all layers, >= 64 KiB blocks
    "out-tall": PlanSpec(OUTPUT_PROJECTIONS, min_block_elements=_ROWS_256),  # >= 256 rows, fewer layers
    "out-mid": PlanSpec(OUTPUT_PROJECTIONS, min_block_elements=_ROWS_256 // 4),  # >= 64 rows
    "linear-tall": PlanSpec(_LINEAR, min_block_elements=_ROWS_256),
    "v": PlanSpec(VALUE_PROJECTIONS),  # first rows of every value matrix, >= 64 KiB blocks
    "v-mid": PlanSpec(VALUE_PROJECTIONS, min_block_elements=_ROWS_256 // 4),
    "v-tall": PlanSpec(VALUE_PROJECTIONS, min_block_elements=_ROWS_256),
    "qv-tall": PlanSpec(r"(?:^|\.)(?:q_proj|v_proj)\.weight$", min_block_elements=_ROWS_256),
    "attn-tall": PlanSpec("attention", min_block_elements=_ROWS_256),
}


# --- families ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    repo_id: str
    lineage: Lineage
    parent: str  # "" for a root
    created: datetime
    kind: str  # the step that made it ("root" for a root)


def build_family(index: int, size: int, rng: np.random.Generator) -> list[Member]:
    """A root, 3 children, then grandchildren spread over the children (VTHR's two generations)."""
    layout = LAYOUTS["llama-2-7b"]
    t0 = datetime(2024, 1, 1) + timedelta(days=int(rng.integers(0, 365)))
    members = [Member(f"fam{index}/root", Lineage(layout, 1000 + index), "", t0, "root")]
    children = min(3, size - 1)
    for i in range(1, size):
        above = members[0] if i <= children else members[1 + (i - children - 1) % children]
        kinds = list(KIND_SHARE)
        kind: StepKind = kinds[int(rng.choice(len(kinds), p=list(KIND_SHARE.values())))]
        lo, hi = DELTA_RANGE[kind]
        delta = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        lineage = above.lineage.child(int(rng.integers(1, 2**62)), delta, kind)
        created = above.created + timedelta(days=float(rng.uniform(1, 30)))
        members.append(Member(f"fam{index}/m{i}-{kind}", lineage, above.repo_id, created, kind))
    return members


# --- reading as the crawler reads ----------------------------------------------------------------


@dataclass
class VirtualFiles:
    """`indexer.sources.RepoFiles` over a generated repo: every read is a byte range of the generator."""

    repo: VirtualRepo
    entry: ModelEntry = field(init=False)
    _sources: list[CallableSource] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.entry = ModelEntry(self.repo.repo_id, self.repo.sha, tuple(sorted(self.repo.files)))

    def open(self, path: str) -> ByteSource:
        blob = self.repo.files[path]
        source = CallableSource(path, blob.size, lambda start, end: blob.read(start, end - start))
        self._sources.append(source)
        return source

    def read_small(self, path: str, *, limit: int) -> bytes:
        blob = self.repo.files[path]
        if blob.size > limit:
            raise ValueError(f"{path}: {blob.size} bytes, over {limit}")
        source = self.open(path)
        return source.read(0, blob.size)

    @property
    def bytes_read(self) -> int:
        return sum(s.bytes_read for s in self._sources)

    @property
    def requests(self) -> int:
        return 0


def read_member(member: Member, budget: int, spec: PlanSpec) -> tuple[dict[str, np.ndarray], ReadPlan, int]:
    """The crawler's steps 2-4 (`indexer.crawl.read_model` for a sharded safetensors repo) with `spec`."""
    files = VirtualFiles(VirtualRepo(member.repo_id, member.lineage, created_at="", parent=member.parent or None))
    sources, where = read_headers(files, (INDEX_FILE,))
    header_bytes = files.bytes_read
    stored = canonical_tensors({name: info for name, (_, info) in where.items()})
    where = {name: where[raw] for name, raw in stored.items()}
    tensors = {name: info for name, (_, info) in where.items()}
    family = family_key({name: info.shape for name, info in tensors.items()})
    plan = plan_reads(tensors, family=family, budget=budget, spec=spec)
    arrays = read_planned(sources, where, plan)
    return arrays, plan, files.bytes_read - header_bytes


# --- lineage on what was read ----------------------------------------------------------------------


def family_accuracy(members: list[Member], reads: Mapping[str, Mapping[str, np.ndarray]],
                    options: Options) -> dict[str, tuple[int, int]]:
    """{step kind: (correct, edges)} of `mother` on the planned arrays of one family.

    The family is assembled as `indexer.lineage.recover` assembles a folder's (`_read_family`: the
    shared layers stacked, the rest as extras, per-model stats, upload times) and solved by the same
    `recover_family`; the folder's relation step (merges, quantized copies, adapters) is left out: these
    families hold none, and on 2 shared cores it cost as much as the lineage itself."""
    shapes = [{n: a.shape for n, a in reads[m.repo_id].items()} for m in members]
    selection = select_layers(shapes, scheme="shared", include_1d=options.include_1d)
    layers = [{n: reads[m.repo_id][n] for n in selection.distance} for m in members]
    family = Family(
        repo_ids=tuple(m.repo_id for m in members),
        layers={n: np.stack([lay[n] for lay in layers]) for n in selection.distance},
        selection=selection,
        stats=tuple(model_stats(lay) for lay in layers),
        created=tuple(m.created.replace(tzinfo=UTC).timestamp() if options.use_time else None for m in members),
        extras=tuple({n: a for n, a in reads[m.repo_id].items() if n not in selection.distance} for m in members),
        dtypes=("BF16",) * len(members),
        copy_rank=((0, 0),) * len(members),
    )
    parent = recover_family(family, options).parent
    out: dict[str, tuple[int, int]] = {}
    for m, p in zip(members, parent, strict=True):
        if m.parent:
            c, e = out.get(m.kind, (0, 0))
            out[m.kind] = (c + int(p >= 0 and members[p].repo_id == m.parent), e + 1)
    return out


def depth_first(members: list[Member]) -> list[Member]:
    kids: dict[str, list[Member]] = {}
    for m in members:
        kids.setdefault(m.parent, []).append(m)
    out: list[Member] = []
    stack = list(reversed(kids[""]))
    while stack:
        m = stack.pop()
        out.append(m)
        stack.extend(reversed(kids.get(m.repo_id, [])))
    return out


@dataclass
class Cell:
    """One (plan, budget) over all families."""

    by_kind: dict[str, list[int]] = field(default_factory=dict)
    bytes_read: int = 0
    blocks: int = 0
    models: int = 0
    read_s: float = 0.0
    lineage_s: float = 0.0

    def add(self, counts: Mapping[str, tuple[int, int]]) -> None:
        for kind, (c, e) in counts.items():
            acc = self.by_kind.setdefault(kind, [0, 0])
            acc[0] += c
            acc[1] += e

    @property
    def accuracy(self) -> float:
        c = sum(v[0] for v in self.by_kind.values())
        e = sum(v[1] for v in self.by_kind.values())
        return c / e if e else math.nan


def run_cell(families: list[list[Member]], budget: int, spec: PlanSpec, options: Options,
             log: Callable[[str], None]) -> Cell:
    cell = Cell()
    for members in families:
        reads: dict[str, dict[str, np.ndarray]] = {}
        t = time.perf_counter()
        for m in depth_first(members):  # a child right after its parent: its blocks are still cached
            arrays, plan, nbytes = read_member(m, budget, spec)
            reads[m.repo_id] = arrays
            cell.bytes_read += nbytes
            cell.blocks += len(plan.blocks)
            cell.models += 1
        cell.read_s += time.perf_counter() - t
        t = time.perf_counter()
        cell.add(family_accuracy(members, reads, options))
        cell.lineage_s += time.perf_counter() - t
    log(f"  {budget // MIB} MiB: accuracy {cell.accuracy:.3f} {dict(sorted(cell.by_kind.items()))}, "
        f"read {cell.read_s:.0f} s, lineage {cell.lineage_s:.0f} s")
    return cell


def render(results: Mapping[tuple[str, int], Cell], kinds: list[str], reference: tuple[str, int]) -> str:
    ref = results[reference].accuracy
    lines = ["| plan | MiB / model | MiB read / model (mean) | blocks / model | edge accuracy | vs reference | "
             + " | ".join(kinds) + " |", "|---|---|---|---|---|---|" + "---|" * len(kinds)]
    for (name, mib), cell in results.items():
        per_kind = [f"{cell.by_kind[k][0]}/{cell.by_kind[k][1]}" if k in cell.by_kind else "-" for k in kinds]
        lines.append(f"| {name} | {mib} | {cell.bytes_read / cell.models / MIB:.2f} | {cell.blocks / cell.models:.0f} | "
                     f"{cell.accuracy:.3f} | {cell.accuracy - ref:+.3f} | " + " | ".join(per_kind) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", type=int, default=5)
    parser.add_argument("--per-family", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mib", default="64,16,4,1")
    parser.add_argument("--plans", default="v2,v-tall")
    parser.add_argument("--reference-plan", default="v-tall", choices=sorted(PLANS))
    parser.add_argument("--reference-mib", type=int, default=32,
                        help="budget of the reference read (0: none, the first cell is the reference)")
    parser.add_argument("--no-time", action="store_true", help="recover without upload times")
    args = parser.parse_args()
    set_block_cache(8192)  # 512 MiB: a parent's blocks at 64 MiB (1,024) while its children are read
    rng = np.random.default_rng(args.seed)
    families = [build_family(i, args.per_family, rng) for i in range(args.families)]
    options = Options(device="cpu", use_time=not args.no_time)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    results: dict[tuple[str, int], Cell] = {}
    for name in args.plans.split(","):
        log(f"plan {name}")
        for mib in (int(x) for x in args.mib.split(",")):
            results[(name, mib)] = run_cell(families, mib * MIB, PLANS[name], options, log)
    reference = (args.reference_plan, args.reference_mib)
    if args.reference_mib:  # last: the cells above are logged even if this largest read is cut short
        log(f"reference: plan {args.reference_plan!r} at {args.reference_mib} MiB")
        results[reference] = run_cell(families, args.reference_mib * MIB, PLANS[args.reference_plan], options, log)
    kinds = [k for k in KIND_SHARE if any(k in c.by_kind for c in results.values())]
    steps = {k: sum(1 for f in families for m in f if m.kind == k) for k in kinds}
    print(f"{args.families} families x {args.per_family} virtual llama-2-7b models (seed {args.seed}), "
          f"edges per kind: {steps}; batch mother, upload times {'off' if args.no_time else 'on'}\n")
    print(render(results, kinds, reference if args.reference_mib else next(iter(results))))


if __name__ == "__main__":
    main()
