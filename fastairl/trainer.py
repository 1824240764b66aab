"""The training loop: one readable function, run under accelerate (one or many processes)."""
from __future__ import annotations

import json
import math
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .config import Config, ConfigError, config_to_dict, dump_config
from .data.augment import spec_from_config
from .methods import build_method, num_views
from .optim import build_optimizer, set_lr
from .schedules import lr_at, momentum_at, scaled_lr


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


def _precision(cfg: Config) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class RunLog:
    """metrics.jsonl + console (+ TensorBoard) on the main process only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.metrics = open(run_dir / "metrics.jsonl", "a") if enabled else None
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

    def close(self) -> None:
        for f in (self.metrics, self.text):
            if f is not None:
                f.close()
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------------------ setup
def prepare_run_dir(cfg: Config, run_dir: Path | None) -> tuple[Path, Path | None]:
    """Return (run_dir, checkpoint to resume from or None); refuse to overwrite a run silently."""
    run_dir = Path(run_dir or Path(cfg.train.out_dir) / (cfg.train.run_name or cfg.name))
    last = run_dir / "last.pt"
    if cfg.train.resume == "auto":
        return run_dir, last if last.is_file() else None
    if cfg.train.resume != "none":
        return run_dir, Path(cfg.train.resume)
    if last.exists():
        raise ConfigError(f"{run_dir} already holds a run (last.pt); continue it with train.resume=auto "
                          f"or choose another train.run_name / --run-dir")
    return run_dir, None


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run dir {run_dir} is not writable ({e.strerror}); set train.out_dir or --run-dir") from None


def _set_cpu_threads(cfg: Config, accelerator) -> None:
    """On CPU, give each process its share of the cores minus its loader workers: oversubscribed
    intra-op threads made steps 5-12x slower on a 2-core machine (benchmarks/bench_step.py)."""
    import os

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
               momentum: float, fmt=torch.contiguous_format) -> dict:
    """One optimisation step: forward both views, backward, optimizer(s), EMA teacher. No host sync."""
    set_lr(optimizer, lr)
    views = [v.to(accelerator.device, non_blocking=True).contiguous(memory_format=fmt) for v in views]
    labels = labels.to(accelerator.device, non_blocking=True)
    with accelerator.autocast():
        loss, metrics = model(views, labels, step)
    optimizer.zero_grad(set_to_none=True)
    if probe_opt is not None:
        probe_opt.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    optimizer.step()
    if probe_opt is not None:
        probe_opt.step()
    unwrapped.update_teacher(momentum)  # on the unwrapped module, never through the DDP wrapper
    return metrics


def train(cfg: Config, run_dir: Path | None = None) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from fastairl.pipelines import build_train_loader

    run_dir, resume_from = prepare_run_dir(cfg, run_dir)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=_precision(cfg),
        # the queue and teacher buffers are kept consistent by the method itself; broadcasting
        # every buffer from rank 0 each step would copy the 65k-key queue for nothing.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    main = accelerator.is_main_process
    _set_cpu_threads(cfg, accelerator)
    if main:
        _check_writable(run_dir)
    accelerator.wait_for_everyone()
    log = RunLog(run_dir, main, cfg.train.tensorboard)
    torch.manual_seed(cfg.train.seed)

    world = accelerator.num_processes
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the "
                          f"{world} processes")
    spec = spec_from_config(cfg.aug, num_views=num_views(cfg))
    loader = build_train_loader(cfg, spec, rank=accelerator.process_index, world_size=world,
                                device=accelerator.device)
    epochs = cfg.train.epochs
    if cfg.train.keep_iterations and cfg.data.class_fraction < 1.0:
        epochs = math.ceil(epochs / cfg.data.class_fraction)  # same number of iterations as 100 %
    spe = loader.steps_per_epoch
    total_steps, warmup_steps = epochs * spe, round(cfg.optim.warmup_epochs * spe)
    peak_lr = scaled_lr(cfg.optim.base_lr, cfg.train.batch_size)

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
    if resume_from is not None:
        state = checkpoint.load(resume_from)
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

    unwrapped = model
    if probe_opt is not None:
        model, optimizer, probe_opt = accelerator.prepare(model, optimizer, probe_opt)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    # The loader is not passed through accelerator.prepare: it shards itself by process index.
    if resume_from is not None:
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])

    def save(name: str) -> None:
        if not main:
            return
        state = {"model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
                 "probe_optimizer": probe_opt.state_dict() if probe_opt is not None else None,
                 "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                 "step": step, "epoch": step / spe, "config": config_to_dict(cfg), "rng": checkpoint.rng_state(),
                 "knn": summary["knn"]}
        checkpoint.save_atomic(state, run_dir / name)

    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    stop_at = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps
    last_ckpt = time.monotonic()
    progress = None
    if main and cfg.train.progress:
        from tqdm import tqdm
        progress = tqdm(total=stop_at, initial=step, dynamic_ncols=True, desc=cfg.name)
    model.train()
    window, t_window, data_wait, n_img, n_steps = {}, time.perf_counter(), 0.0, 0, 0
    while step < stop_at:
        epoch = step // spe
        loader.set_epoch(epoch, start_step=step % spe)
        t_data = time.perf_counter()
        for views, labels in loader:
            data_wait += time.perf_counter() - t_data
            lr = lr_at(step, total_steps, warmup_steps, peak_lr, cfg.optim.schedule, cfg.optim.min_lr)
            mom = momentum_at(step, total_steps, cfg.method.ema.base, cfg.method.ema.schedule)
            metrics = train_step(model, unwrapped, optimizer, probe_opt, accelerator, views, labels, step, lr, mom, fmt)
            step += 1
            n_steps += 1
            n_img += labels.shape[0] * world
            for k, v in metrics.items():  # accumulate on device: no host sync until the log line
                window[k] = window.get(k, 0.0) + v.detach()
            if progress is not None:
                progress.update(1)
            if step % cfg.train.log_every == 0 or step == stop_at:
                vals = {k: float(v) / n_steps for k, v in window.items()}  # the one sync per log interval
                dt = time.perf_counter() - t_window
                row = {"step": step, "epoch": round(step / spe, 4), "lr": lr, "momentum": mom,
                       "img_per_s": n_img / dt, "data_wait_frac": data_wait / dt, **vals}
                log.record(row)
                if progress is not None:
                    progress.set_postfix(loss=f"{vals['loss_ssl']:.4f}", lr=f"{lr:.3g}")
                window, t_window, data_wait, n_img, n_steps = {}, time.perf_counter(), 0.0, 0, 0
            if main and time.monotonic() - last_ckpt > cfg.train.ckpt_every_minutes * 60:
                save("last.pt")
                last_ckpt = time.monotonic()
            if step >= stop_at:
                break
            t_data = time.perf_counter()
        if step % spe == 0:  # an epoch ended
            done = step // spe
            if cfg.probe.knn_every_epochs and cfg.data.val and done % cfg.probe.knn_every_epochs == 0:
                acc = knn_monitor(cfg, unwrapped.encoder(), accelerator, loader.num_classes)
                if main:
                    summary["knn"].append({"epoch": done, "top1": acc})
                    log.record({"step": step, "epoch": done, "knn_top1": acc})
            save("last.pt")
            last_ckpt = time.monotonic()
            if cfg.train.ckpt_every_epochs and done % cfg.train.ckpt_every_epochs == 0:
                save(f"epoch_{done:03d}.pt")
    if step % spe:
        save("last.pt")  # stopped mid-epoch (max_steps): resumable from here
    if progress is not None:
        progress.close()
    accelerator.wait_for_everyone()
    summary.update({"name": cfg.name, "steps": step, "epochs": epochs, "steps_per_epoch": spe,
                    "global_batch": cfg.train.batch_size})
    if cfg.probe.final_eval and main:
        summary["final_eval"] = final_evaluation(cfg, unwrapped, accelerator, loader.num_classes, log)
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info(f"run dir: {run_dir}")
    log.close()
    accelerator.end_training()
    return summary


# ------------------------------------------------------------------------------------- evaluation
def _eval_features(cfg: Config, encoder: nn.Module, device, max_bank: int | None = None):
    from fastairl.pipelines import build_eval_loader

    from .eval.features import extract

    bank = build_eval_loader(cfg, cfg.data.train, max_samples=max_bank)
    val = build_eval_loader(cfg, cfg.data.val)
    return extract(encoder, bank, device, cfg.model.channels_last), extract(encoder, val, device, cfg.model.channels_last)


def knn_monitor(cfg: Config, encoder: nn.Module, accelerator, num_classes: int) -> float | None:
    """Epoch-end kNN top-1 on the held-out split (main process; the others wait)."""
    from .eval.features import knn_accuracy

    acc = None
    if accelerator.is_main_process:
        (bf, by), (vf, vy) = _eval_features(cfg, encoder, accelerator.device, cfg.probe.knn_max_bank)
        acc = knn_accuracy(bf, by, vf, vy, cfg.probe.knn_k, cfg.probe.knn_temperature, num_classes)
    accelerator.wait_for_everyone()
    return acc


def final_evaluation(cfg: Config, model: nn.Module, accelerator, num_classes: int, log: RunLog) -> dict:
    """kNN + linear probe (cached features) of the trained encoder and of a random-init encoder of
    the same architecture: the baseline the pretraining has to beat."""
    from .eval.features import knn_accuracy, linear_probe
    from .models import build_backbone

    if not cfg.data.val:
        raise ConfigError("probe.final_eval needs data.val (a held-out split)")
    torch.manual_seed(cfg.train.seed + 12345)
    random_init = build_backbone(cfg.model.arch, cfg.model.cifar_stem).to(accelerator.device)
    if cfg.model.channels_last:
        random_init = random_init.to(memory_format=torch.channels_last)
    out = {}
    for name, enc in (("pretrained", model.encoder()), ("random_init", random_init)):
        (bf, by), (vf, vy) = _eval_features(cfg, enc, accelerator.device)
        knn = knn_accuracy(bf, by, vf, vy, cfg.probe.knn_k, cfg.probe.knn_temperature, num_classes)
        lin = linear_probe(bf, by, vf, vy, num_classes, epochs=cfg.probe.final_linear_epochs, seed=cfg.train.seed)
        out[name] = {"knn_top1": knn, "linear_top1": lin["top1"], "linear_top5": lin["top5"]}
        log.info(f"final eval [{name}]: kNN top-1 {knn:.2f}%  linear top-1 {lin['top1']:.2f}%")
    out["gain_over_random_init"] = {k: out["pretrained"][k] - out["random_init"][k] for k in out["pretrained"]}
    return out
