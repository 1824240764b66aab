"""Command line: `fastairl train RECIPE [overrides]`, `fastairl data digits|photos --out DIR`."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, dump_config, load_config


def _train_parser(prog: str = "fastairl train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Pretrain with a YAML recipe.")
    p.add_argument("recipe", help="recipes/*.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value, validated like the recipe")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", action="store_true", help="same as train.resume=auto")
    p.add_argument("--run-dir", default=None, help="default: train.out_dir/<run_name or recipe name>")
    return p


def train_main(argv: list[str]) -> int:
    args = _train_parser().parse_intermixed_args(argv)  # overrides may follow --run-dir
    overrides = list(args.overrides) + (["train.resume=auto"] if args.resume else [])
    try:
        cfg = load_config(args.recipe, overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        from .trainer import train

        train(cfg, args.run_dir)
    except (ConfigError, ImportError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def data_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fastairl data", description="Build a bundled real-image dataset.")
    p.add_argument("kind", choices=["digits", "photos"])
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=32, help="digits: image side in pixels")
    p.add_argument("--n-images", type=int, default=1000, help="photos: number of JPEGs")
    args = p.parse_args(argv)
    from .data import bundled

    try:
        info = (bundled.make_digits(args.out, size=args.size) if args.kind == "digits"
                else bundled.make_photo_corpus(args.out, n_images=args.n_images))
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.kind} dataset ready in {args.out}: {info.get('counts', info) if isinstance(info, dict) else info}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": train_main, "data": data_main}
    if not argv or argv[0] not in commands:
        print("usage: fastairl {train,data} ...  (fastairl train -h for help)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
