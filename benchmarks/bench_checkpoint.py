"""What an epoch-end checkpoint costs training: the training thread's share of a save, the write in the
background, and how much that write slows the steps it overlaps.

On a recipe's model and optimiser (bench_step's FastairlStep, synthetic data, the trainer's precision
and memory format), through the trainer's save path (`checkpoint.BackgroundWriter.submit` and
`RunCheckpoints.save_last`: snapshot to page-locked host buffers, then digest, write, fsync and read
back on the writer's thread), this measures in one process:

1. `first_submit_s`: the first save's cost on the training thread (state_dict, the page-locked buffers
   allocated, the copy); `submit_s`: later saves, which reuse the buffers;
2. `write_s`: from the return of submit until the write is on disk (the writer thread's time);
3. steps with a write running against steps without, interleaved: after each submit, steps run (each
   synchronised) until the write is done, at least `--steps` of them; once it is done, as many steps
   run again. `slowdown` = t_during / t_quiet per pair (1.0: the write costs the steps nothing).
   `overlap` = write_s / t_during: the share of the `during` block the write covered (below 1 when
   `--steps` steps outlast the write; the block always holds the whole write);
4. `pageable_copy_s`: the state copied tensor by tensor to pageable memory (what the snapshot's
   page-locked buffers replaced), for comparison.

Warm-up steps are not timed. Nothing here asserts on speed.

    python benchmarks/bench_checkpoint.py --device cuda --arch resnet50 --crop 224 --batch 128
    python benchmarks/bench_checkpoint.py --quick       # a CPU smoke run, under a minute
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step as B  # noqa: E402  (the recipe setup, timers and environment of the step benchmark)

FULL = dict(arch="resnet18", crop=64, batch=32, steps=10, warmup=3, repeats=3, threads=None)
QUICK = dict(arch="resnet10", crop=32, batch=8, steps=2, warmup=1, repeats=2, threads=1)


def train_state(fast: B.FastairlStep, cfg) -> dict:
    """What the trainer's save() checkpoints, minus the run's bookkeeping (kNN history, log window)."""
    from fastairl import checkpoint
    from fastairl.config import config_to_dict

    return {"model": fast.unwrapped.state_dict(), "optimizer": fast.optimizer.state_dict(),
            "probe_optimizer": fast.probe_opt.state_dict() if fast.probe_opt is not None else None,
            "step": fast.step_no, "epoch": 0.0, "config": config_to_dict(cfg), "rng": checkpoint.rng_state()}


def state_bytes(state) -> int:
    from fastairl.checkpoint import _map_tensors

    sizes = []
    _map_tensors(state, lambda t: sizes.append(t.numel() * t.element_size()))
    return sum(sizes)


def measure(cfg, accelerator, args, run_dir: Path) -> dict:
    from fastairl import checkpoint
    from fastairl.checkpoint import BackgroundWriter, RunCheckpoints, _to_cpu
    from fastairl.data.augment import spec_from_config
    from fastairl.methods import num_views
    from fastairl.pipelines.torch_ref import SyntheticLoader

    device = accelerator.device
    torch.manual_seed(cfg.train.seed)
    spec = spec_from_config(cfg.aug, num_views=num_views(cfg))
    data = SyntheticLoader(spec, cfg.train.batch_size, num_classes=cfg.data.num_classes,
                           num_samples=cfg.train.batch_size, seed=cfg.train.seed, device=device)
    fast = B.FastairlStep(cfg, accelerator, cfg.data.num_classes)
    step = lambda: fast(data.views, data.labels)  # noqa: E731
    B.timed_block(step, args.warmup, device)  # the optimiser's state exists from here on
    writer, ckpts = BackgroundWriter(), RunCheckpoints(run_dir)

    def synced_step():
        step()
        B.sync(device)  # so that the host sees when the steps, not their launches, overlap the write

    submits, writes, during, quiet, counts = [], [], [], [], []
    for r in range(args.repeats + 1):  # the first save allocates the page-locked buffers
        B.sync(device)
        t0 = time.perf_counter()
        done = {}
        writer.submit(lambda copy: (ckpts.save_last(copy), done.setdefault("t", time.perf_counter())),
                      train_state(fast, cfg))
        t1 = time.perf_counter()
        n = 0
        while n < args.steps or "t" not in done:  # the whole write inside the block
            synced_step()
            n += 1
        t_during = time.perf_counter() - t1
        writer.wait()
        t_quiet = B.timed_block(synced_step, n, device)
        if r:
            submits.append(t1 - t0)
            writes.append(done["t"] - t1)
            during.append(t_during)
            quiet.append(t_quiet)
            counts.append(n)
        else:
            first_submit = t1 - t0
    B.sync(device)
    t0 = time.perf_counter()
    copy = _to_cpu(train_state(fast, cfg))
    pageable = time.perf_counter() - t0
    b = cfg.train.batch_size
    return {"state_mb": state_bytes(copy) / 2**20,
            "checkpoint_file_mb": (run_dir / checkpoint.LAST).stat().st_size / 2**20,
            "first_submit_s": first_submit, "submit_s": B.summary(submits), "write_s": B.summary(writes),
            "pageable_copy_s": pageable if device.type == "cuda" else None,  # on the CPU there is nothing to copy
            "steps_per_block": counts,
            "img_per_s_during_write": B.summary([n * b / t for n, t in zip(counts, during)]),
            "img_per_s_quiet": B.summary([n * b / t for n, t in zip(counts, quiet)]),
            "slowdown": B.summary([d / q for d, q in zip(during, quiet)]),
            "overlap": B.summary([w / d for w, d in zip(writes, during)])}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="byol_lars", help=f"recipe name ({', '.join(B.ALL_METHODS)})")
    ap.add_argument("--arch", help=f"backbone (default {FULL['arch']}, --quick {QUICK['arch']})")
    ap.add_argument("--crop", type=int, help=f"crop size (default {FULL['crop']}, --quick {QUICK['crop']})")
    ap.add_argument("--batch", type=int, help=f"batch size (default {FULL['batch']}, --quick {QUICK['batch']})")
    ap.add_argument("--steps", type=int, help=f"timed steps per block (default {FULL['steps']})")
    ap.add_argument("--warmup", type=int, help=f"untimed steps first (default {FULL['warmup']})")
    ap.add_argument("--repeats", type=int, help=f"timed saves after the first (default {FULL['repeats']})")
    ap.add_argument("--hidden", type=int, default=512, help="projector / predictor hidden width (0: the recipe's)")
    ap.add_argument("--queue", type=int, default=4096, help="MoCo queue size (0: the recipe's 65536)")
    ap.add_argument("--classes", type=int, default=1000, help="classes of the synthetic labels (probe size)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice; --quick 1)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--dir", help="where the checkpoints are written (default: a temporary folder beside --out)")
    ap.add_argument("--out", default="bench_out/checkpoint.json")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run on CPU")
    args = ap.parse_args(argv)
    B.apply_presets(ap, args, FULL, QUICK, ("steps", "warmup", "repeats", "batch"))
    args.workers = 0  # bench_step.method_config's data.workers: synthetic data, no loader
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from fastairl.config import config_to_dict

    accelerator, on_cuda = B.make_accelerator(args)
    env = B.environment_info(accelerator)
    cfg, overrides = B.method_config(args.method, args, on_cuda)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = Path(args.dir) if args.dir else out.parent
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ckpt_", dir=base) as run_dir:
        res = measure(cfg, accelerator, args, Path(run_dir))
    report = {"benchmark": "bench_checkpoint", "command": " ".join(["python"] + sys.argv), "environment": env,
              "params": dict(vars(args), device=str(accelerator.device), checkpoint_dir=str(base)),
              "config": {"recipe": f"recipes/{args.method}.yaml", "overrides": overrides,
                         "resolved": config_to_dict(cfg)},
              "results": res}
    out.write_text(json.dumps(report, indent=2) + "\n")
    s = lambda k: f"{res[k]['median']:.3f} s ({res[k]['min']:.3f}-{res[k]['max']:.3f})"  # noqa: E731
    print(f"{args.method} {args.arch} on {accelerator.device}: state {res['state_mb']:.0f} MiB, file "
          f"{res['checkpoint_file_mb']:.0f} MiB\n  first submit {res['first_submit_s']:.3f} s, later submits "
          f"{s('submit_s')}, pageable copy {res['pageable_copy_s'] or 0:.3f} s\n  write {s('write_s')}\n"
          f"  steps {res['img_per_s_quiet']['median']:.1f} img/s quiet, "
          f"{res['img_per_s_during_write']['median']:.1f} during a write ({res['steps_per_block']} steps): slowdown "
          f"{res['slowdown']['median']:.2f} (overlap {res['overlap']['median']:.2f})\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
