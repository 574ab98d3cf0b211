"""`python -m gptoss_engine.parallel.compare DIR`: the layouts that bench/multi_gpu_check.sh ran,
each against the one-process run of the same dtype: greedy tokens equal (all of them, and how
many leading tokens per sequence before a difference: bf16 sums in another order per layout, so
a late near-tie may flip), and the decode speed ratio. Prints a table, writes DIR/compare.json.
"""
from __future__ import annotations

import json
import pathlib
import sys


def leading_equal(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare(runs: dict[str, dict]) -> list[dict]:
    """One row per run: its layout, tokens vs the world-1 run of its dtype, speed ratio."""
    refs = {r["layout"]["dtype"]: (name, r) for name, r in runs.items() if r["layout"]["world"] == 1}
    rows = []
    for name, r in sorted(runs.items()):
        ref_name, ref = refs.get(r["layout"]["dtype"], (None, None))
        row = {"name": name, **r["layout"], "generate_tok_s": r["generate_tok_s"], "reference": ref_name}
        if ref is not None:
            lead = [leading_equal(a, b) for a, b in zip(r["tokens"], ref["tokens"])]
            row.update(all_equal=r["tokens"] == ref["tokens"], min_leading_equal=min(lead),
                       tokens_per_seq=len(ref["tokens"][0]), speedup=round(r["generate_tok_s"] / ref["generate_tok_s"], 3))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m gptoss_engine.parallel.compare DIR", file=sys.stderr)
        return 2
    folder = pathlib.Path(args[0])
    runs = {}
    for p in sorted(folder.glob("*.json")):
        if p.name == "compare.json":
            continue
        text = p.read_text().strip()
        if not text:
            print(f"{p.stem}: no result (see {p.stem}.log)")
            continue
        runs[p.stem] = json.loads(text)
    rows = compare(runs)
    for row in rows:
        tail = (f"tokens equal: {row['all_equal']} (>= {row['min_leading_equal']}/{row['tokens_per_seq']} leading "
                f"per sequence), {row['speedup']}x" if row["reference"] else "no reference of this dtype")
        print(f"{row['name']}: world {row['world']} attention TP {row['attention_tp']} MoE EP {row['moe_ep']} "
              f"TP {row['moe_tp']} {row['dtype']}: {row['generate_tok_s']} tok/s; {tail} vs {row['reference']}")
    (folder / "compare.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
