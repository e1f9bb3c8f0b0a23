"""The cache and memory tables of docs/benchmarks.md, from the `vlablocks bench --json` files.

    python benchmarks/tables.py docs/benchmarks --update docs/benchmarks.md

Rows are the JSON files of the folder, in name order; a table leaves out files without its
figures (a ``--no-train`` run has no memory row).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlablocks.io.atomic import replace_section


def _machine(result: dict[str, Any]) -> str:
    machine = result["machine"]
    return machine.get("gpu", "").replace("NVIDIA ", "") or f"CPU, {machine['torch_threads']} threads"


def _mode(result: dict[str, Any]) -> str:
    settings = result["settings"]
    compiled = {"off": "eager", "step": "compiled per step", "chunk": "compiled per chunk"}[settings["compile"]]
    batch = f", batch {settings['batch']}" if settings["batch"] != 1 else ""
    return f"{settings['dtype']} {compiled}{batch}"


def cache_table(results: Sequence[dict[str, Any]]) -> str:
    rows = ["| recipe | machine | mode | prefix pass | denoise step | cached chunk | recompute | speed-up | "
            "token-work ratio | achieved / theory |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if r.get("speedup") is None:
            continue
        rows.append(
            f"| {r['recipe']} | {_machine(r)} | {_mode(r)} | {r['prefix_ms']:.1f} ms | {r['step_ms']:.2f} ms | "
            f"{r['chunk_cached_ms']:.1f} ms | {r['chunk_recompute_ms']:.1f} ms | {r['speedup']:.2f}x | "
            f"{r['token_work_ratio']:.2f}x | **{r['speedup_vs_theory']:.2f}** |"
        )
    return "\n".join(rows)


def memory_table(results: Sequence[dict[str, Any]]) -> str:
    rows = ["| recipe | machine | batch | peak, plain | peak, checkpointed | cut | step, plain | "
            "step, checkpointed | time cost |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        memory = r["memory_mib"]
        if "train" not in memory or r.get("train_step_ms") is None:
            continue
        plain, checkpointed = memory["train"], memory["train_checkpointed"]
        cost = r["train_step_checkpointed_ms"] / r["train_step_ms"] - 1
        rows.append(
            f"| {r['recipe']} | {_machine(r)} {r['settings']['dtype']} | {r['settings']['train_batch']} | "
            f"{plain:,.0f} MiB | {checkpointed:,.0f} MiB | **{plain / checkpointed:.2f}x** | "
            f"{r['train_step_ms']:,.0f} ms | {r['train_step_checkpointed_ms']:,.0f} ms | +{100 * cost:.0f} % |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="folder of vlablocks bench --json files")
    parser.add_argument("--update", default=None, help="markdown file with 'cache' and 'memory' sections")
    args = parser.parse_args(argv)
    results = [json.loads(path.read_text()) for path in sorted(Path(args.folder).glob("*.json"))
               if path.name != "scaling.json"]
    tables = {"cache": cache_table(results), "memory": memory_table(results)}
    for name, text in tables.items():
        if args.update:
            replace_section(args.update, name, text)
        else:
            sys.stdout.write(f"{text}\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
