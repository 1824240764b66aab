"""Command line: `fastairl train|eval RECIPE [overrides]`, `fastairl data digits|photos|cifar --out DIR`,
`fastairl convert INPUT OUT.beton` (FFCV), the analysis tools (norms, cka, normrescale, export),
`fastairl study STUDY.yaml` (the paper's studies) and `fastairl taxonomy` (WordNet label maps)."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, dump_config, load_config
from .data.datasets import ImageReadError

# errors that are the user's input (config, data, run dir, checkpoint, a missing extra): one line, exit 2
USER_ERRORS = (ConfigError, ImportError, FileNotFoundError, ValueError, ImageReadError)


def _train_parser(prog: str = "fastairl train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Pretrain with a YAML recipe.")
    p.add_argument("recipe", help="recipes/*.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value, validated like the recipe")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", action="store_true", help="same as train.resume=auto")
    p.add_argument("--run-dir", default=None, help="default: train.out_dir/<run_name or recipe name>")
    return p


# `fastairl train` exit codes besides 0 (done), 1 (a crash, with a traceback) and 2 (a one-line error
# about the config, the data, the run dir or a checkpoint):
EXIT_NONFINITE = 3  # train.nan_policy=stop met a non-finite loss; the last good checkpoint is intact
EXIT_PREEMPTED = 75  # SIGTERM / SIGUSR1: checkpoint saved, continue with --resume (sysexits EX_TEMPFAIL)


def train_main(argv: list[str]) -> int:
    args = _train_parser().parse_intermixed_args(argv)  # overrides may follow --run-dir
    overrides = list(args.overrides) + (["train.resume=auto"] if args.resume else [])
    try:
        cfg = load_config(args.recipe, overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        from .trainer import NonFiniteError, Preempted, train

        try:
            train(cfg, args.run_dir)
        except Preempted as e:
            print(e, file=sys.stderr)
            return EXIT_PREEMPTED
        except NonFiniteError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_NONFINITE
    except USER_ERRORS as e:
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


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="fastairl eval", description="kNN / linear / fine-tuning evaluation "
                                "of a backbone (recipes/linear_a.yaml, linear_b.yaml, knn.yaml, ...).")
    p.add_argument("recipe", help="an eval recipe (its eval: section picks the protocol)")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. eval.checkpoint=runs/x/last.pt")
    p.add_argument("--checkpoint", default=None, help="same as eval.checkpoint=... (or 'random')")
    p.add_argument("--run-dir", default=None, help="default: train.out_dir/<run_name or recipe name>")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_intermixed_args(argv)
    overrides = list(args.overrides) + ([f"eval.checkpoint={args.checkpoint}"] if args.checkpoint else [])
    try:
        cfg = load_config(args.recipe, overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        from .eval.run import evaluate

        evaluate(cfg, args.run_dir)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def convert_main(argv: list[str]) -> int:
    from .pipelines.convert import main as convert

    return convert(argv, prog="fastairl convert")


# subcommand -> fastairl.analysis module with a main(argv): the analysis and export tools
ANALYSIS_TOOLS = {"norms": "norms", "cka": "cka", "normrescale": "rescale", "export": "export"}


def _analysis_main(tool: str):
    def run(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(f"{__package__}.analysis.{ANALYSIS_TOOLS[tool]}").main(argv)
    return run


def _module_main(module: str):
    """`fastairl.<module>.main(argv)`, imported when the subcommand runs (study, taxonomy)."""
    def run(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(f"{__package__}.{module}").main(argv)
    return run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": train_main, "eval": eval_main, "data": data_main, "convert": convert_main}
    commands.update({tool: _analysis_main(tool) for tool in ANALYSIS_TOOLS})
    commands.update(study=_module_main("study"), taxonomy=_module_main("data.taxonomy"))
    if not argv or argv[0] not in commands:
        print("usage: fastairl {train,eval,data,convert,norms,cka,normrescale,export,study,taxonomy} ...  "
              "(fastairl train -h for help)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
