#!/usr/bin/env python3
"""Writes fixtures/plans/invalid/: one defect per file, each derived from
fixtures/plans/valid/every-kind.yaml, and EXPECTED.tsv naming the field path and a phrase the error
message must contain. Deterministic; run from the repository root:

    python3 scripts/make-invalid-plans.py
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "fixtures", "plans", "valid", "every-kind.yaml")
OUT = os.path.join(ROOT, "fixtures", "plans", "invalid")

base = open(BASE, encoding="utf-8").read()
body = "\n".join(l for l in base.splitlines() if not l.startswith("#")) + "\n"
H3 = "  - {head: 3, pattern: {kind: vertical_slash, vertical: {buckets: [{up_to: 4096, value: 500}, {up_to: 8192, value: 1000}]}, slash: {scale: 2.5, exponent: 0.75, min: 64, max: 6096}}, recall: 0.958, validated_recall: 0.951, flops_fraction: 0.31}\n"
H1 = "  - {head: 1, pattern: {kind: streaming, sink: 4, recent: 256}, recall: 0.962, validated_recall: 0.957, flops_fraction: 0.071}\n"
assert H3 in body and H1 in body, "base fixture changed: update this script"


def sub(old, new, text=body, count=1):
    assert old in text, old
    return text.replace(old, new, count)


def layer1_block():
    start = body.index("- layer: 1\n")
    return body[start:]


cases = []  # (file name, bytes, expected field, phrase in the message)


def case(name, content, field, phrase):
    data = content if isinstance(content, bytes) else content.encode("utf-8")
    cases.append((name, data, field, phrase))


case("malformed-yaml.yaml", sub("layers:\n", "layers: [\n"), "layers", "line 27")
case("truncated.yaml", body[: len(body) // 2], "layers[0].heads", "unclosed")
garbage = bytes((i * 151 + 7) % 256 for i in range(512))
case("binary-garbage.bin", garbage, "(document)", "UTF-8")
case("empty.yaml", "", "(document)", "empty")
case("deeply-nested.yaml", body + "extra: " + "[" * 200 + "]" * 200 + "\n", "extra[0]", "Depth")
bomb = ["schema_version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
for i in range(1, 12):
    bomb.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i-1}"] * 10) + "]")
case("alias-bomb.yaml", "\n".join(bomb) + "\n", "", "budget breached")
case("duplicate-key.yaml", sub("  head_dim: 64\n", "  head_dim: 64\n  head_dim: 128\n"), "", "duplicate")
case("unknown-key.yaml", sub("  last_q: 64\n", "  last_q: 64\n  lastq: 32\n"), "defaults.lastq", "unknown field")
case("unknown-pattern-kind.yaml", sub("kind: streaming", "kind: strided"), "layers[0].heads[1].pattern.kind", "strided")
case("missing-field.yaml", sub("  head_dim: 64\n", ""), "model", "head_dim")
case("wrong-type.yaml", sub("  layers: 2\n", "  layers: two\n"), "model.layers", "u32")
case("negative-budget.yaml", sub("recent: 256}", "recent: -256}"), "layers[0].heads[1].pattern", "negative")
case("zero-budget.yaml", sub("sink: 4,", "sink: 0,"), "layers[0].heads[1].pattern.sink", ">= 1")
case("budget-over-context.yaml", sub("recent: 256}", "recent: 100000}"), "layers[0].heads[1].pattern.recent", "max_context")
case("fraction-out-of-range.yaml", sub("{fraction: 0.05, min: 128}", "{fraction: 1.5, min: 128}"), "layers[0].heads[2].pattern.local.fraction", "(0, 1]")
case("buckets-not-increasing.yaml", sub("{up_to: 8192, value: 1000}", "{up_to: 2048, value: 1000}"), "layers[0].heads[3].pattern.vertical.buckets[1].up_to", "increase")
case("layer-index-out-of-range.yaml", sub("- layer: 1\n", "- layer: 7\n"), "layers[1].layer", "out of range")
case("head-index-out-of-range.yaml", sub(H1, H1.replace("head: 1,", "head: 9,")), "layers[0].heads[1].head", "out of range")
case("duplicated-head.yaml", sub(H1, H1.replace("head: 1,", "head: 0,")), "layers[0].heads[1].head", "more than once")
case("missing-head.yaml", sub(H3, ""), "layers[0].heads", "4")
case("layer-count-mismatch.yaml", sub("  layers: 2\n", "  layers: 3\n"), "layers", "model.layers says 3")
case("head-count-mismatch.yaml", sub("  query_heads: 4\n", "  query_heads: 6\n"), "layers[0].heads", "model.query_heads says 6")
case("gqa-not-divisible.yaml", sub("  kv_heads: 2\n", "  kv_heads: 3\n"), "model.query_heads", "multiple")
case("bad-fingerprint.yaml", sub("fingerprint: sha256:9f2c", "fingerprint: md5:9f2c"), "model.fingerprint", "sha256")
case("unknown-schema-version.yaml", sub("schema_version: 1\n", "schema_version: 7\n"), "schema_version", "found 7")
case("missing-schema-version.yaml", sub("schema_version: 1\n", ""), "schema_version", "missing")
case("target-recall-out-of-range.yaml", sub("target_recall: 0.95", "target_recall: 0"), "provenance.target_recall", "(0, 1]")
case("recall-out-of-range.yaml", sub("recall: 0.962,", "recall: 1.2,"), "layers[0].heads[1].recall", "[0, 1]")
case("block-size-not-power-of-two.yaml", sub("  block_k: 64\n", "  block_k: 48\n"), "defaults.block_k", "power of two")
case("block-sparse-both-selectors.yaml", sub("{kind: block_sparse, top_k: 8}", "{kind: block_sparse, top_k: 8, coverage: 0.9}"), "layers[1].heads[0].pattern", "exactly one")
case("grid-phase-out-of-range.yaml", sub("stride: 256, phase: 0", "stride: 256, phase: 300"), "layers[1].heads[1].pattern.phase", "< stride")
case("token-select-keep-over-block.yaml", sub("block: 64, keep: 8", "block: 64, keep: 80"), "layers[1].heads[3].pattern.keep", "block")
case("token-select-spread-out-of-range.yaml", sub("block: 64, keep: 8", "block: 64, keep: 8, spread: 12.5"), "layers[1].heads[3].pattern.spread", "[0, 8]")

os.makedirs(OUT, exist_ok=True)
for old in os.listdir(OUT):
    os.remove(os.path.join(OUT, old))
rows = ["# file\tfield\tphrase  (written by scripts/make-invalid-plans.py; each file has one defect)"]
for name, data, field, phrase in cases:
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)
    rows.append(f"{name}\t{field}\t{phrase}")
with open(os.path.join(OUT, "EXPECTED.tsv"), "w", encoding="utf-8") as f:
    f.write("\n".join(rows) + "\n")
print(f"wrote {len(cases)} invalid plans to {os.path.relpath(OUT, ROOT)}", file=sys.stderr)
