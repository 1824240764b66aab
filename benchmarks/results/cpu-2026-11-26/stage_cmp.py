"""Per-batch CPU cost of what the DALI train graph needs besides the pixels: before (32336c0: crop
windows, factors and coins computed by DALI operators in the graph) and after (the host's view_plan
fed by external_source), side by side in one process, rounds interleaved. Both read the files
(`fn.io.file.read`); neither decodes. The pixel ops are not part of this comparison.

    git worktree add /tmp/old 32336c0
    python stage_cmp.py /tmp/old/pipelines/dali.py CORPUS_DIR BATCH THREADS  # CORPUS_DIR: e.g. make_photo_corpus(root, 512, 8)
"""
import importlib.util
import os
import statistics
import sys
import time
import numpy as np
from pathlib import Path
from nvidia.dali import fn, pipeline_def, types
import fastairl.pipelines.dali as NEW
spec_ = importlib.util.spec_from_file_location("old_dali", sys.argv[1])
OLD = importlib.util.module_from_spec(spec_); sys.modules["old_dali"] = OLD; spec_.loader.exec_module(OLD)
from fastairl.data.augment import make_spec

root = Path(sys.argv[2])  # e.g. fastairl.data.bundled.make_photo_corpus(root, 512, 8)
files = sorted(str(p) for p in root.rglob("*.jpg"))
spec = make_spec("byol_sym", crop_size=224)
B, threads = int(sys.argv[3]), int(sys.argv[4])
sizes = NEW._Sizes(files)
sizes(range(len(files)))  # warm cache (first epoch pays the headers; timed separately below)

def paths_of(idx):
    return [np.frombuffer(os.fsencode(files[i]), dtype=np.uint8) for i in idx]

def old_src(info):
    idx = np.arange(info.iteration * B, (info.iteration + 1) * B) % len(files)
    return paths_of(idx), np.zeros((B, 1), np.int32), OLD.draws(0, 0, idx, 2)

layout = NEW.plan_layout(spec.views, True)
fields = [f for view in layout for f in view]
def new_src(info):
    idx = np.arange(info.iteration * B, (info.iteration + 1) * B) % len(files)
    u = NEW.draws(0, 0, idx, 2)
    h, w = sizes(idx)
    plans = [NEW.view_plan(u[:, k], h, w, v) for k, v in enumerate(spec.views)]
    return [paths_of(idx), np.zeros((B, 1), np.int32)] + [a for p in plans for a in p.values()]

@pipeline_def(enable_conditionals=True)
def old_pipe():
    paths, label, u = fn.external_source(source=old_src, num_outputs=3, batch=True, batch_info=True,
                                         dtype=[types.UINT8, types.INT32, types.FLOAT64], ndim=[1, 1, 2])
    jpegs = fn.io.file.read(paths)
    shape = fn.peek_image_shape(jpegs, dtype=types.INT32, **OLD._AS_STORED)
    outs = [label, jpegs]
    for k, v in enumerate(spec.views):
        outs += list(OLD.crop_window(shape, u[k, :OLD.CROP_DRAWS], v))
        p = u[k, OLD.CROP_DRAWS:]
        factors, which = OLD.jitter_draws(v, p)
        outs += list(factors.values()) + [which, OLD._between(p[OLD._SIGMA], *v.blur_sigma)]
        outs += [p[OLD._JITTER] < v.jitter_p, p[OLD._GRAY] < v.gray_p, p[OLD._BLUR] < v.blur_p, p[OLD._SOLARIZE] < v.solarize_p]
    return tuple(outs)

@pipeline_def
def new_pipe():
    paths, label, *nodes = fn.external_source(source=new_src, num_outputs=2 + len(fields), batch=True, batch_info=True,
        dtype=[types.UINT8, types.INT32] + [NEW._DALI_TYPE[d] for _, d, _ in fields], ndim=[1, 1] + [n for *_, n in fields])
    return (label, fn.io.file.read(paths), *nodes)

def timed(pipe, reps=7, n=5):
    pipe.build()
    for _ in range(3): pipe.run()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n): pipe.run()
        ts.append((time.perf_counter() - t) / n * 1e3)
    return ts

res = {"old": [], "new": []}
for r in range(3):  # interleaved rounds
    for name, mk in (("old", old_pipe), ("new", new_pipe)):
        res[name] += timed(mk(batch_size=B, num_threads=threads, device_id=None, prefetch_queue_depth=2))
for k, v in res.items():
    print(f"{k}: median {statistics.median(v):.1f} ms/batch (min {min(v):.1f}, max {max(v):.1f}) batch {B} threads {threads}")
# host-side cost alone (on the thread that calls the loader)
idx = np.arange(B)
t = time.perf_counter(); 
for _ in range(50): new_src(type("I", (), {"iteration": 0})())
print(f"new host callback: {(time.perf_counter() - t) / 50 * 1e3:.2f} ms/batch")
t = time.perf_counter()
for _ in range(50): old_src(type("I", (), {"iteration": 0})())
print(f"old host callback: {(time.perf_counter() - t) / 50 * 1e3:.2f} ms/batch")
cold = NEW._Sizes(files)
t = time.perf_counter(); cold(range(len(files))); dt = (time.perf_counter() - t) / len(files)
print(f"header sizes, first read: {dt * 1e6:.1f} us/file ({dt * B * 1e3:.1f} ms per batch of {B}, first epoch only)")
