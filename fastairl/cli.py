"""Command line: `fastairl train RECIPE [overrides]`, `fastairl data digits|photos|cifar --out DIR`,
`fastairl convert INPUT OUT.beton` (FFCV conversion)."""
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
    p = argparse.ArgumentParser(prog="fastairl data", description="Build a real-image dataset folder: the "
                                "bundled digits / photo corpus, or CIFAR(-LT) from its python pickles.")
    p.add_argument("kind", choices=["digits", "photos", "cifar"])
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=32, help="digits: image side in pixels")
    p.add_argument("--n-images", type=int, default=1000, help="photos: number of JPEGs")
    p.add_argument("--src", help="cifar: the folder holding cifar-10-batches-py or cifar-100-python")
    p.add_argument("--lt-ratio", type=float, default=None, help="cifar: long-tailed train split (e.g. 100)")
    p.add_argument("--seed", type=int, default=0, help="cifar: the long-tailed subset's seed")
    args = p.parse_args(argv)
    from .data import bundled
    from .data.datasets import DataError

    try:
        if args.kind == "digits":
            info = bundled.make_digits(args.out, size=args.size)
        elif args.kind == "photos":
            info = bundled.make_photo_corpus(args.out, n_images=args.n_images)
        else:
            if not args.src:
                raise DataError("fastairl data cifar needs --src (the folder with cifar-10-batches-py or "
                                "cifar-100-python)")
            info = bundled.make_cifar_folder(args.src, args.out, lt_ratio=args.lt_ratio, seed=args.seed)
    except (ImportError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.kind} dataset ready in {args.out}: {info.get('totals', info)}")
    return 0


def convert_main(argv: list[str]) -> int:
    from .pipelines.convert import main as convert

    return convert(argv, prog="fastairl convert")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": train_main, "data": data_main, "convert": convert_main}
    if not argv or argv[0] not in commands:
        print("usage: fastairl {train,data,convert} ...  (fastairl train -h for help)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
