"""The training loop: one readable function, run under accelerate (one or many processes).

What a run survives (README "What survives what"): SIGKILL at any point (atomic, verified
checkpoints, exact resume), SIGTERM / SIGUSR1 (checkpoint, then `Preempted`), a non-finite loss
(`NonFiniteGuard`), unreadable images (`BadDataMonitor`), a full disk (the previous checkpoint stays),
a dead or hung peer process (the process-group timeout, train.dist_timeout_minutes)."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .config import Config, ConfigError, config_to_dict, dump_config
from .data.augment import spec_from_config
from .data.datasets import DataError, check_same_classes
from .methods import build_method, num_views
from .optim import build_optimizer, set_lr
from .schedules import lr_at, momentum_at, run_length, scaled_lr


# ------------------------------------------------------------------------------------ environment
def environment(accelerator) -> dict:
    import accelerate
    import torchvision

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname(),
           "torch": torch.__version__, "torchvision": torchvision.__version__,
           "accelerate": accelerate.__version__, "cuda": torch.version.cuda,
           "device": str(accelerator.device), "num_processes": accelerator.num_processes,
           "mixed_precision": accelerator.mixed_precision, "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def native_bf16() -> bool:
    """CUDA with bf16 in hardware (Ampere or newer). torch's default check also accepts emulated
    bf16 (V100, T4), which runs slower than fp16, and allocates on the current GPU to find out."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def _precision(cfg: Config) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if native_bf16() else "fp16"


class RunLog:
    """metrics.jsonl + console (+ TensorBoard) on the main process only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.metrics = open(self.path, "a") if enabled else None
        self.text = open(run_dir / "log.txt", "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: optional dependency
            self.tb = SummaryWriter(str(run_dir / "tb"))

    def info(self, msg: str) -> None:
        if self.enabled:
            from tqdm import tqdm
            tqdm.write(msg)
            self.text.write(msg + "\n")
            self.text.flush()

    def record(self, row: dict) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def trim(self, step: int) -> None:
        """Keep the rows up to `step`, the step a run resumes from: an interrupted leg may have logged
        steps after its last checkpoint (the resumed run logs them again) or a line cut short by a kill."""
        if not self.enabled:
            return
        self.metrics.close()
        keep = []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if line.endswith("\n") and row.get("step", 0) <= step:
                keep.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, self.path)
        self.metrics = open(self.path, "a")

    def close(self) -> None:
        for f in (self.metrics, self.text):
            if f is not None:
                f.close()
        if self.tb is not None:
            self.tb.close()


class Window:
    """Sums over one log interval; the metrics stay on the device until the log line."""

    def __init__(self):
        self.sums: dict = {}
        self.start, self.data_wait, self.images, self.steps, self.skipped = time.perf_counter(), 0.0, 0, 0, 0

    def add(self, metrics: dict, images: int) -> None:
        self.steps += 1
        self.images += images
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach()

    def row(self) -> dict:
        """The interval's means: the one host-device sync per log interval."""
        dt = time.perf_counter() - self.start
        vals = {k: float(v) / max(self.steps, 1) for k, v in self.sums.items()}
        return {"img_per_s": self.images / dt, "data_wait_frac": self.data_wait / dt, **vals}

    def state_dict(self) -> dict:
        """The partial interval, checkpointed so a run resumed inside it logs the same means."""
        return {"sums": self.sums, "steps": self.steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict, device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.steps, self.skipped = state["steps"], state["skipped"]


# ------------------------------------------------------------------------------------------ faults
class Preempted(Exception):
    """The run stopped on SIGTERM / SIGUSR1 after saving a checkpoint (CLI exit code 75)."""

    def __init__(self, signum: int, step: int, path: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved to "
                         f"{path}; continue with train.resume=auto (--resume)")


class NonFiniteError(RuntimeError):
    """train.nan_policy=stop met a non-finite loss or gradient (CLI exit code 3)."""


class HostComm:
    """Host-side integer reductions across processes over gloo (CPU tensors), so agreeing on a flag
    never waits for the device. CPU runs use the default (gloo) group; CUDA runs get a gloo group
    beside NCCL, with the same timeout."""

    def __init__(self, world: int, timeout: timedelta):
        self.world, self.group = world, None
        if world > 1:
            import torch.distributed as dist

            if dist.get_backend() != "gloo":
                self.group = dist.new_group(backend="gloo", timeout=timeout)

    def reduce(self, values: list[int], op: str) -> list[int]:
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op={"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}[op],
                        group=self.group)
        return t.tolist()


class StopSignals:
    """SIGTERM / SIGUSR1 (preemption). The handler only records the signal; the loop polls it before
    every step and at epoch ends, the processes agree on it (a host-side max), and all stop at the
    same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, comm: HostComm):
        self.comm, self.received, self._previous = comm, 0, {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        self.received = self.received or signum
        # A signal to the whole process group also ends the loader's worker processes, and torch's
        # SIGCHLD handler would raise wherever the main process is (mid-step, mid-checkpoint): the
        # stop is ours to make, after this step.
        if hasattr(signal, "SIGCHLD") and signal.SIGCHLD not in self._previous:
            self._previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def poll(self) -> int:
        """The signal to stop on, the same on every process; 0: none."""
        return self.comm.reduce([self.received], "max")[0]


@contextlib.contextmanager
def _released(loader):
    """Release a loader that holds resources between epochs (DALI's pipeline: threads, GPU memory) when
    training ends, normally or not, before the final evaluation."""
    try:
        yield
    finally:
        close = getattr(loader, "close", None)
        if close is not None:
            close()


@contextlib.contextmanager
def _joined(writer: checkpoint.BackgroundWriter, log):
    """On an error in the training loop, the checkpoint being written still reaches the disk before
    the error leaves the trainer (a failure of that write too is logged)."""
    try:
        yield
    except BaseException:
        try:
            writer.wait()
        except Exception as e:
            log.info(f"warning: the checkpoint being written when training stopped failed too: {e}")
        raise


def _batches(loader, stop: StopSignals):
    """The loader's batches. A signal sent to the whole process group also kills the loader's worker
    processes; the loader then fails, and None comes instead of a batch: the caller's poll stops every
    process at this step boundary."""
    it = None
    while True:
        try:
            it = it or iter(loader)
            batch = next(it)
        except StopIteration:
            return
        except Exception:
            if stop.received:
                yield None  # the caller's poll sees the signal: every process stops at this step
                return
            raise
        yield batch


class NonFiniteGuard:
    """Non-finite loss or gradients, per `train.nan_policy`.

    stop: a bad-step count and the first bad step accumulate on the device, with no host sync; they
    are read at the log interval (which syncs anyway) and before every checkpoint, so no checkpoint
    ever holds a state after a non-finite step, and the run stops naming the step.
    skip: the step's flag is read on the host every step (one sync per step, like AMP's GradScaler)
    and a bad step leaves no trace: no optimizer, probe or teacher update, and the buffers it changed
    in the forward (BN statistics, the MoCo queue) are restored.
    With fp16 the GradScaler owns gradient overflow (it skips those steps itself): only the loss is
    checked there. Gradients are all-reduced, so every process sees the same gradient verdict."""

    NONE = 2 ** 62

    def __init__(self, policy: str, unwrapped: nn.Module, check_grads: bool, device, comm: HostComm):
        self.policy, self.check_grads, self.comm = policy, check_grads, comm
        self.params = [p for p in unwrapped.parameters() if p.requires_grad]
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.first = torch.full((), self.NONE, dtype=torch.long, device=device)
        self.skipped, self.last_skipped = 0, False
        self.buffers = list(unwrapped.buffers()) if policy == "skip" else []
        self.saved = [b.clone() for b in self.buffers]

    def before_forward(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def _bad(self, loss: torch.Tensor) -> torch.Tensor:
        x = loss.detach().float()  # a 0-dim tensor on the device
        grads = [p.grad for p in self.params if p.grad is not None] if self.check_grads else []
        if grads:  # any nan / inf makes the sum of the norms non-finite
            x = x + torch.stack([n.float() for n in torch._foreach_norm(grads)]).sum()
        return ~torch.isfinite(x)

    def after_backward(self, loss: torch.Tensor, step: int) -> bool:
        """Whether to apply the update of step `step` (0-based)."""
        bad = self._bad(loss)
        if self.policy == "stop":
            self.count += bad
            self.first = torch.where(bad & (self.first == self.NONE), step + 1, self.first)
            return True
        self.last_skipped = bool(self.comm.reduce([int(bad)], "max")[0])  # the per-step sync of skip
        if self.last_skipped:
            torch._foreach_copy_(self.buffers, self.saved)
            self.skipped += 1
        return not self.last_skipped

    def bad_steps(self, collective: bool) -> tuple[int, int]:
        """(number of bad steps, the first one, 1-based as in metrics.jsonl) so far; stop policy."""
        count, first = torch.stack([self.count, self.first]).tolist()
        if collective:
            count, first = self.comm.reduce([count], "sum")[0], self.comm.reduce([first], "min")[0]
        return count, first


class BadDataMonitor:
    """Unreadable training images: the loader replaces each with another sample; this logs each path
    once and stops the run when more than data.max_bad_fraction of the files are bad."""

    def __init__(self, loader, max_fraction: float, say, comm: HostComm):
        self.source = loader
        while self.source is not None and not hasattr(self.source, "bad_files"):
            self.source = getattr(self.source, "loader", None)  # wrapped, e.g. by DeviceAugLoader
        self.max_fraction, self.say, self.comm = max_fraction, say, comm
        self.reported: set[str] = set()

    def check(self) -> None:
        """At log steps, on every process together (the count is summed over processes)."""
        if self.source is None:
            return
        bad = self.source.bad_files()
        for path in bad:
            if path not in self.reported:
                self.say(f"warning: unreadable image {path} in data.train: replaced by another sample")
                self.reported.add(path)
        total, n = self.comm.reduce([len(bad)], "sum")[0], self.source.num_samples
        if total > self.max_fraction * n:
            shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise DataError(f"{total} of the {n} images in data.train are unreadable, more than "
                            f"data.max_bad_fraction={self.max_fraction:g}: {shown}; fix or remove them, "
                            f"or raise data.max_bad_fraction")


# ------------------------------------------------------------------------------------------ setup
def prepare_run_dir(cfg: Config, run_dir: Path | None) -> tuple[Path, Path | str | None]:
    """Return (run_dir, what to resume from: "auto", a checkpoint path, or None); refuse to overwrite
    a run silently."""
    run_dir = Path(run_dir or Path(cfg.train.out_dir) / (cfg.train.run_name or cfg.name))
    if cfg.train.resume == "auto":
        return run_dir, "auto"
    if cfg.train.resume != "none":
        return run_dir, Path(cfg.train.resume)
    existing = checkpoint.RunCheckpoints(run_dir).candidates()
    if existing:
        raise ConfigError(f"{run_dir} already holds a run ({existing[0].name}); continue it with "
                          f"train.resume=auto or choose another train.run_name / --run-dir")
    return run_dir, None


def _resume_state(resume: Path | str | None, ckpts: checkpoint.RunCheckpoints,
                  log: RunLog) -> tuple[Path | None, dict | None]:
    """(checkpoint, its verified state) to resume from; (None, None) to start afresh."""
    if resume is None:
        return None, None
    if resume == "auto":  # the newest checkpoint that verifies; damaged ones are named in warnings
        return ckpts.latest(log.info) or (None, None)
    return resume, checkpoint.load(resume)


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        with open(probe, "w") as f:
            f.write("ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run dir {run_dir} is not writable ({e.strerror}); set train.out_dir or --run-dir") from None


def set_cpu_threads(cfg: Config, accelerator) -> None:
    """On CPU, give each process its share of the cores minus its loader workers: oversubscribed
    intra-op threads made steps 5-12x slower on a 2-core machine (benchmarks/bench_step.py)."""
    if accelerator.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // accelerator.num_processes - cfg.data.workers))


def build_model(cfg: Config, num_classes: int, accelerator, log: RunLog) -> nn.Module:
    model = build_method(cfg, num_classes)
    if cfg.method.bn == "sync":
        if torch.cuda.is_available() and accelerator.num_processes > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.info("method.bn=sync: SyncBatchNorm needs CUDA and >1 process; using per-process BN here")
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.model.compile:
        for net in (model.student, getattr(model, "teacher", None)):
            if net is not None:
                net["backbone"].compile()  # in place: state_dict keys stay unchanged
    return model


# ------------------------------------------------------------------------------------------- train
def train_step(model, unwrapped, optimizer, probe_opt, accelerator, views, labels, step: int, lr: float,
               momentum: float, fmt=torch.contiguous_format, guard: NonFiniteGuard | None = None) -> dict:
    """One optimisation step: forward both views, backward, optimizer(s), EMA teacher. No host sync
    (except under train.nan_policy=skip, see NonFiniteGuard)."""
    set_lr(optimizer, lr)
    views = [v.to(accelerator.device, non_blocking=True).contiguous(memory_format=fmt) for v in views]
    labels = labels.to(accelerator.device, non_blocking=True)
    if guard is not None:
        guard.before_forward()
    with accelerator.autocast():
        loss, metrics = model(views, labels, step)
    optimizer.zero_grad(set_to_none=True)
    if probe_opt is not None:
        probe_opt.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    if guard is None or guard.after_backward(loss, step):
        if probe_opt is not None and accelerator.scaler is not None:
            accelerator.scaler.step(probe_opt)  # unprepared: unscaled by this step's scale, before update()
        elif probe_opt is not None:
            probe_opt.step()
        optimizer.step()  # prepared: under fp16 also the scaler's one update() of the step
        unwrapped.update_teacher(momentum)  # on the unwrapped module, never through the DDP wrapper
    return metrics


def train(cfg: Config, run_dir: Path | None = None) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    from fastairl.pipelines import build_eval_loader, build_train_loader

    run_dir, resume = prepare_run_dir(cfg, run_dir)
    timeout = timedelta(minutes=cfg.train.dist_timeout_minutes)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=_precision(cfg),
        # the queue and teacher buffers are kept consistent by the method itself; broadcasting
        # every buffer from rank 0 each step would copy the 65k-key queue for nothing.
        # A process that dies or hangs makes the others fail after `timeout`, not wait forever.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False),
                         InitProcessGroupKwargs(timeout=timeout)])
    main = accelerator.is_main_process
    set_cpu_threads(cfg, accelerator)
    created = not run_dir.exists()
    if main:
        _check_writable(run_dir)
    accelerator.wait_for_everyone()
    ckpts = checkpoint.RunCheckpoints(run_dir)
    world = accelerator.num_processes
    comm = HostComm(world, timeout)
    torch.manual_seed(cfg.train.seed)

    try:  # the data is checked before the run dir gets any file: a bad path leaves nothing behind
        if cfg.train.batch_size % world:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the "
                              f"{world} processes")
        spec = spec_from_config(cfg.aug, num_views=num_views(cfg))
        loader = build_train_loader(cfg, spec, rank=accelerator.process_index, world_size=world,
                                    device=accelerator.device)
        if cfg.probe.final_eval and not cfg.data.val:
            raise ConfigError("probe.final_eval needs data.val (a held-out split)")
        if cfg.data.val and (cfg.probe.knn_every_epochs or cfg.probe.final_eval):
            # the kNN monitor's and the final evaluation's labels must mean what the training's mean
            check_same_classes(loader.classes, build_eval_loader(cfg, cfg.data.val).classes)
    except Exception:
        if main and created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only if still empty
        raise
    log = RunLog(run_dir, main, cfg.train.tensorboard)
    # train.keep_iterations: the full-data recipe's iterations, and warm-up share, on a class subset
    epochs, warmup_epochs = run_length(cfg.train.epochs, cfg.optim.warmup_epochs, cfg.data.class_fraction,
                                       cfg.train.keep_iterations)
    spe = loader.steps_per_epoch
    total_steps, warmup_steps = epochs * spe, round(warmup_epochs * spe)
    if epochs != cfg.train.epochs:
        log.info(f"train.keep_iterations, data.class_fraction={cfg.data.class_fraction:g}: {epochs} epochs of "
                 f"{spe} steps, warm-up {warmup_epochs:g} epochs ({warmup_steps} steps)")
        # the epoch intervals are not scaled (periodic files keep their names for studies): say what they give
        every = {key: n for key, n in (("probe.knn_every_epochs", cfg.probe.knn_every_epochs if cfg.data.val else 0),
                                      ("train.ckpt_every_epochs", cfg.train.ckpt_every_epochs)) if n}
        if any(epochs // n > cfg.train.epochs // n for n in every.values()):
            log.info("note: " + "; ".join(
                f"{key}={n} gives {epochs // n} times in {epochs} epochs ({cfg.train.epochs // n} in the full "
                f"recipe's {cfg.train.epochs}; {key}={round(n * epochs / cfg.train.epochs)} keeps that)"
                for key, n in every.items()))
    peak_lr = scaled_lr(cfg.optim.base_lr, cfg.train.batch_size)
    if warmup_steps >= total_steps:
        log.info(f"warning: optim.warmup_epochs={cfg.optim.warmup_epochs:g} covers all {cfg.train.epochs} epochs: the lr "
                 f"only rises (to {lr_at(total_steps - 1, total_steps, warmup_steps, peak_lr):.3g}; peak {peak_lr:.3g}) and "
                 f"never decays; lower optim.warmup_epochs")
    if cfg.probe.final_labels_per_class and not cfg.probe.final_eval:
        log.info(f"warning: probe.final_labels_per_class={list(cfg.probe.final_labels_per_class)} is ignored: "
                 f"probe.final_eval is false")

    # on the device before the optimizer is built, so SGD can choose its fused CUDA kernel
    model = build_model(cfg, loader.num_classes, accelerator, log).to(accelerator.device)
    optimizer = build_optimizer(cfg.optim, model.student, cfg.train.batch_size)
    probe_opt = (torch.optim.SGD(model.probe.parameters(), lr=cfg.probe.lr, momentum=0.9)
                 if model.probe is not None else None)
    if main:
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        env = environment(accelerator)
        env.update(global_batch=cfg.train.batch_size, steps_per_epoch=spe, epochs=epochs, peak_lr=peak_lr)
        (run_dir / "env.json").write_text(json.dumps(env, indent=2))
        (run_dir / "classes.txt").write_text("\n".join(loader.classes) + "\n")

    step = 0
    summary: dict = {"knn": []}
    resume_from, state = _resume_state(resume, ckpts, log)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:  # another arch / head size / method: torch's message spans many lines
            raise checkpoint.CheckpointError(
                f"{resume_from} does not fit this config ({str(e).splitlines()[-1].strip()}); resume with "
                f"the run's config.yaml or start a new run dir") from None
        optimizer.load_state_dict(state["optimizer"])
        if probe_opt is not None:
            probe_opt.load_state_dict(state["probe_optimizer"])
        step = state["step"]
        summary["knn"] = state.get("knn", [])  # the epoch-end history of the earlier legs
        log.info(f"resumed from {resume_from} at step {step} (epoch {step // spe}, batch {step % spe})")
    if main:
        ckpts.remove_stale_tmp()
        if resume is not None:
            log.trim(step)

    unwrapped = model
    # The probe's optimizer is not prepared: accelerate's optimizer wrapper calls the fp16 scaler's
    # update() after every step(), and one update per training step is the GradScaler contract.
    model, optimizer = accelerator.prepare(model, optimizer)
    # The loader is not passed through accelerator.prepare: it shards itself by process index.
    window = Window()
    guard = NonFiniteGuard(cfg.train.nan_policy, unwrapped, check_grads=accelerator.scaler is None,
                           device=accelerator.device, comm=comm)
    if state is not None:
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        guard.skipped = state.get("nonfinite_skipped", 0)
        if "log_window" in state:
            window.load_state_dict(state["log_window"], accelerator.device)
    say = log.info if main else (lambda msg: print(f"[rank {accelerator.process_index}] {msg}", file=sys.stderr))
    bad_data = BadDataMonitor(loader, cfg.data.max_bad_fraction, say, comm)
    last_good = f"{resume_from} (step {step})" if resume_from is not None else "none (no checkpoint written yet)"
    saved_step = step if resume_from is not None else -1

    writer = checkpoint.BackgroundWriter()

    def check_finite(collective: bool) -> None:
        """train.nan_policy=stop: raise if any step so far had a non-finite loss or gradient."""
        if cfg.train.nan_policy != "stop":
            return
        count, first = guard.bad_steps(collective)
        if count:
            also = ""
            try:
                writer.wait()  # last_good below is the newest checkpoint on disk
            except checkpoint.CheckpointError as e:  # the run stops for the NaN (exit 3) all the same
                also = f"; the last checkpoint write failed too: {e}"
            raise NonFiniteError(
                f"non-finite loss or gradients at step {first} ({count} bad step(s) up to step {step}); "
                f"stopped without saving: the last good checkpoint is {last_good}; lower optim.base_lr "
                f"or set train.nan_policy=skip{also}")

    def save(epoch_file: bool = False, collective: bool = True) -> None:
        """Checkpoint the state after `step` steps (main process), never one after a non-finite step.
        The main process copies the state to host memory; `writer` writes it while training goes on."""
        nonlocal saved_step
        check_finite(collective)  # every process, first: a NaN is the error even when a write failed too
        writer.wait()  # the previous write (main process): if it failed, the run stops here
        if main:
            state = {"model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
                     "probe_optimizer": probe_opt.state_dict() if probe_opt is not None else None,
                     "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                     "step": step, "epoch": step / spe, "config": config_to_dict(cfg),
                     "rng": checkpoint.rng_state(), "knn": summary["knn"], "nonfinite_skipped": guard.skipped,
                     "log_window": window.state_dict()}

            def write(copy: dict, epoch: int = step // spe) -> None:  # on the writer's thread
                nonlocal last_good
                last_good = f"{ckpts.save_last(copy)} (step {copy['step']})"  # once it is on disk
                if epoch_file:
                    ckpts.save_periodic(copy, epoch, cfg.train.keep_last_k)

            writer.submit(write, state)
        if collective:  # a main-only (timed) save leaves the closing save to every process
            saved_step = step

    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    stop_at = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps
    last_ckpt = time.monotonic()
    progress = None
    if main and cfg.train.progress:
        from tqdm import tqdm
        progress = tqdm(total=stop_at, initial=step, dynamic_ncols=True, desc=cfg.name)
    model.train()
    halt, knn_loaders = 0, None
    with StopSignals(comm) as stop, _released(loader), _joined(writer, log):
        while step < stop_at and not halt:
            loader.set_epoch(step // spe, start_step=step % spe)
            t_data, start = time.perf_counter(), step
            for batch in _batches(loader, stop):
                window.data_wait += time.perf_counter() - t_data
                # Every process polls before each step, so all take the same steps: a process whose
                # loader died with the signal (batch None) has received it, and all stop here.
                halt = stop.poll()
                if halt:
                    break
                views, labels = batch
                lr = lr_at(step, total_steps, warmup_steps, peak_lr, cfg.optim.schedule, cfg.optim.min_lr)
                mom = momentum_at(step, total_steps, cfg.method.ema.base, cfg.method.ema.schedule)
                metrics = train_step(model, unwrapped, optimizer, probe_opt, accelerator, views, labels, step,
                                     lr, mom, fmt, guard=guard)
                step += 1
                if guard.last_skipped:
                    window.skipped += 1
                    log.info(f"warning: step {step}: non-finite loss or gradients, step skipped "
                             f"({guard.skipped} so far; train.nan_policy=skip)")
                else:
                    window.add(metrics, labels.shape[0] * world)
                if progress is not None:
                    progress.update(1)
                if step % cfg.train.log_every == 0 or step == stop_at:
                    row = {"step": step, "epoch": round(step / spe, 4), "lr": lr, "momentum": mom, **window.row()}
                    if cfg.train.nan_policy == "skip":
                        row["nonfinite_skipped"] = window.skipped
                    log.record(row)
                    if progress is not None and "loss_ssl" in row:
                        progress.set_postfix(loss=f"{row['loss_ssl']:.4f}", lr=f"{lr:.3g}")
                    window = Window()
                    bad_data.check()
                    check_finite(collective=True)
                if cfg.train.ckpt_every_steps and step % cfg.train.ckpt_every_steps == 0 and step % spe:
                    save()
                    last_ckpt = time.monotonic()
                elif main and time.monotonic() - last_ckpt > cfg.train.ckpt_every_minutes * 60:
                    save(collective=False)
                    last_ckpt = time.monotonic()
                if step >= stop_at:
                    break
                t_data = time.perf_counter()
            halt = halt or stop.poll()  # a signal at the last step: the checkpoint before any kNN
            if step % spe == 0 and step > start:  # an epoch ended (the epoch-end checkpoint is below)
                done = step // spe
                if (cfg.probe.knn_every_epochs and cfg.data.val and done % cfg.probe.knn_every_epochs == 0
                        and not halt):
                    # built (the folders listed) at the first monitored epoch, then reused
                    knn_loaders = knn_loaders or _eval_loaders(cfg, cfg.probe.knn_max_bank, accelerator)
                    writer.wait()  # its loader forks worker processes: none while a write's thread runs
                    acc = knn_monitor(cfg, unwrapped.encoder(), accelerator, loader.num_classes, knn_loaders)
                    if main:
                        summary["knn"].append({"epoch": done, "top1": acc})
                        log.record({"step": step, "epoch": done, "knn_top1": acc})
                bad_data.check()
                save(epoch_file=bool(cfg.train.ckpt_every_epochs) and done % cfg.train.ckpt_every_epochs == 0)
                last_ckpt = time.monotonic()
            halt = halt or stop.poll()  # a signal during the epoch end
        if saved_step != step:
            save()  # stopped mid-epoch (max_steps or a signal): resumable from here
        writer.wait()  # on disk before the exit on a signal, the final evaluation and the summary
    if progress is not None:
        progress.close()
    if halt:
        preempted = Preempted(halt, step, run_dir / checkpoint.LAST)
        log.info(str(preempted))
        log.close()
        raise preempted
    accelerator.wait_for_everyone()
    summary.update({"name": cfg.name, "steps": step, "epochs": epochs, "steps_per_epoch": spe,
                    "global_batch": cfg.train.batch_size})
    if cfg.train.nan_policy == "skip":
        summary["nonfinite_skipped"] = guard.skipped
    if cfg.probe.final_eval and main:
        summary["final_eval"] = final_evaluation(cfg, unwrapped, accelerator, loader.num_classes, log)
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info(f"run dir: {run_dir}")
    log.close()
    accelerator.end_training()
    return summary


# ------------------------------------------------------------------------------------- evaluation
def _eval_loaders(cfg: Config, max_bank: int | None = None, procs=None) -> tuple:
    """Loaders of the bank (training split) and of the validation split; with `procs` (the
    Accelerator) each reads this process's share."""
    from fastairl.pipelines import build_eval_loader

    # their classes are those train() checked at start (check_same_classes)
    shard = dict(rank=procs.process_index, world_size=procs.num_processes) if procs is not None else {}
    return (build_eval_loader(cfg, cfg.data.train, max_samples=max_bank, **shard),
            build_eval_loader(cfg, cfg.data.val, **shard))


@contextlib.contextmanager
def _rank0_buffers(module: nn.Module, world: int):
    """Inside: every process holds rank 0's buffers (BN statistics, the checkpoint's), so per-process
    BN (shuffle-BN, plain) encodes every process's share alike. After: each its own again."""
    if world == 1:
        yield
        return
    own = [b.clone() for b in module.buffers()]
    for b in module.buffers():
        torch.distributed.broadcast(b, 0)
    try:
        yield
    finally:
        for b, mine in zip(module.buffers(), own):
            b.copy_(mine)


def knn_monitor(cfg: Config, encoder: nn.Module, accelerator, num_classes: int, loaders: tuple) -> float:
    """Epoch-end kNN top-1 on the held-out split: every process encodes its share of the bank and of
    the queries, gets every query, and searches its share of the bank (the candidates are merged)."""
    from .eval.features import extract, knn_accuracies

    bank, val = loaders
    with _rank0_buffers(encoder, accelerator.num_processes):
        bf, by = extract(encoder, bank, accelerator.device, cfg.model.channels_last)  # this process's share
        vf, vy = extract(encoder, val, accelerator.device, cfg.model.channels_last, accelerator)  # every query
    k = cfg.probe.knn_k
    return knn_accuracies(bf, by, vf, vy, (k,), cfg.probe.knn_temperature, num_classes, procs=accelerator)[k]


def final_evaluation(cfg: Config, model: nn.Module, accelerator, num_classes: int, log: RunLog) -> dict:
    """kNN + linear probe (cached features) of the trained encoder and of a random-init encoder of
    the same architecture: the baseline the pretraining has to beat. With probe.final_labels_per_class
    also with few labels (mean over stratified draws), where what pretraining learnt matters most."""
    from .eval.features import PROBE_BATCH, extract, few_label_eval, knn_accuracy, linear_probe
    from .models import build_backbone

    p = cfg.probe
    torch.manual_seed(cfg.train.seed + 12345)
    random_init = build_backbone(cfg.model.arch, cfg.model.cifar_stem).to(accelerator.device)
    if cfg.model.channels_last:
        random_init = random_init.to(memory_format=torch.channels_last)
    out, loaders = {}, _eval_loaders(cfg)  # the whole of both splits, in this process
    for name, enc in (("pretrained", model.encoder()), ("random_init", random_init)):
        (bf, by), (vf, vy) = (extract(enc, ld, accelerator.device, cfg.model.channels_last) for ld in loaders)
        knn = knn_accuracy(bf, by, vf, vy, p.knn_k, p.knn_temperature, num_classes)
        lin = linear_probe(bf, by, vf, vy, num_classes, epochs=p.final_linear_epochs, seed=cfg.train.seed)
        out[name] = {"knn_top1": knn, "linear_top1": lin["top1"], "linear_top5": lin["top5"]}
        log.info(f"final eval [{name}]: kNN top-1 {knn:.2f}%  linear top-1 {lin['top1']:.2f}%")
        steps = p.final_linear_epochs * -(-len(by) // PROBE_BATCH)  # as many steps as the full-label probe
        for n in p.final_labels_per_class:
            try:
                few = few_label_eval(bf, by, vf, vy, n, p.final_label_draws, p.knn_k, p.knn_temperature,
                                     num_classes, steps, cfg.train.seed)
            except ValueError as e:  # after training: report it, keep the run and the other numbers
                out[name][f"{n}_per_class"] = {"error": f"probe.final_labels_per_class: {e} ({cfg.data.train})"}
                log.info(f"warning: {out[name][f'{n}_per_class']['error']}")
                continue
            out[name][f"{n}_per_class"] = few
            log.info(f"final eval [{name}], {n} labels per class ({few['draws']} draws): kNN top-1 "
                     f"{few['knn_top1']:.2f} ± {few['knn_top1_std']:.2f}%  linear top-1 "
                     f"{few['linear_top1']:.2f} ± {few['linear_top1_std']:.2f}%")
    pre, rnd = out["pretrained"], out["random_init"]
    out["gain_over_random_init"] = {k: pre[k] - rnd[k] for k in ("knn_top1", "linear_top1", "linear_top5")}
    for key in (f"{n}_per_class" for n in p.final_labels_per_class):
        if "error" not in pre[key]:
            out["gain_over_random_init"][key] = {k: pre[key][k] - rnd[key][k] for k in ("knn_top1", "linear_top1")}
    return out
