#!/usr/bin/env bash
# The main job end to end on the embedded default, as `make demo` runs it:
# train a small zoo -> serve it with the local Hub emulator -> crawl it over HTTP -> query -> export ->
# print the forest and its accuracy against the zoo's ground truth -> draw one family (text and HTML).
set -euo pipefail
OUT=${1:-demo-out}
INDEX=${INDEX:-.venv/bin/index}
export INDEX_HOME="$OUT/home"

step() { printf '\n== %s\n' "$*" >&2; }

rm -rf "$OUT/home" "$OUT/forest.parquet" "$OUT/family.html"
mkdir -p "$OUT"

step "1. train the small zoo (3 trees x 7 ViTs, real training; reused when already built)"
if [ ! -f "$OUT/zoo/zoo.json" ]; then
  $INDEX zoo make "$OUT/zoo" --preset small --split ft --seed 0 --force
fi
# a grandchild (its parent has a parent), so the query shows a chain; truth.csv is parent,child
first=$(awk -F, 'NR > 1 { up[$2] = $1 } END { for (c in up) if (up[c] != "" && up[up[c]] != "") print c }' \
  "$OUT/zoo/truth.csv" | sort | head -n 1)

step "2. inspect one model (headers only)"
$INDEX inspect "$OUT/zoo/$first" | tail -n 7

step "3. serve the zoo with the local Hub emulator on 127.0.0.1"
$INDEX hub serve "$OUT/zoo" --port 0 > "$OUT/hub.url" &
hub_pid=$!
trap 'kill $hub_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$OUT/hub.url" ] && break; sleep 0.1; done
url=$(head -n 1 "$OUT/hub.url")
echo "emulator at $url" >&2

step "4. crawl it over HTTP with the real huggingface_hub client"
$INDEX crawl --endpoint "$url" --json

step "5. crawl again: nothing new, nothing fetched"
$INDEX crawl --endpoint "$url" --json

step "6. query one model"
$INDEX query "$first"

step "7. export the forest"
$INDEX export "$OUT/forest.parquet"
$INDEX stats

step "8. the forest and its accuracy against the zoo's truth"
$INDEX eval "$OUT/zoo" --forest "$OUT/forest.parquet" --truth "$OUT/zoo/truth.csv"

step "9. its family drawn: in the terminal, then as one self-contained page (opens offline)"
$INDEX show "$first"
$INDEX show "$first" --format html > "$OUT/family.html"
echo "wrote $OUT/family.html: open it in any browser, no network needed" >&2
echo "browse the whole store: INDEX_HOME=$OUT/home $INDEX web   (then open http://127.0.0.1:8765/)" >&2
