"""A/B of the DALI train pipeline: an older pipelines/dali.py against the working tree's, the same
views (byol_sym), fresh loaders per round, rounds interleaved; on the GPU when CUDA is present.

    git show 32336c0:pipelines/dali.py > /tmp/dali_old.py
    python ab_dali.py /tmp/dali_old.py CORPUS_DIR BATCH ROUNDS CROP [THREADS]

CORPUS_DIR: any folder of JPEGs, e.g. one made by fastairl.data.bundled.make_photo_corpus.
"""
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

import fastairl.pipelines.dali as NEW
from fastairl.data.augment import make_spec

spec_ = importlib.util.spec_from_file_location("old_dali", sys.argv[1])
OLD = importlib.util.module_from_spec(spec_)
sys.modules["old_dali"] = OLD
spec_.loader.exec_module(OLD)
files = sorted(str(p) for p in Path(sys.argv[2]).rglob("*.jpg")) * 4
B, rounds, crop = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
threads = int(sys.argv[6]) if len(sys.argv) > 6 else 2
device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
spec = make_spec("byol_sym", crop_size=crop)
res = {"old": [], "new": []}
for r in range(rounds):
    for name, mod in (("old", OLD), ("new", NEW)):
        loader = mod.DaliTrainLoader([(f, 0) for f in files], ["0"], spec, B, threads=threads, seed=r,
                                     device_id=device_id)
        if hasattr(loader, "read_sizes"):
            loader.read_sizes()  # the first epoch's header reads are not the steady state
        loader.set_epoch(0)
        it = iter(loader)
        next(it), next(it)
        if device_id is not None:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(8):
            next(it)
        if device_id is not None:
            torch.cuda.synchronize()
        res[name].append(8 * B / (time.perf_counter() - t))
        loader.close()
print(f"device {'cuda:%d' % device_id if device_id is not None else 'cpu'}, batch {B}, crop {crop}, threads {threads}")
for k, x in res.items():
    print(f"{k}: median {statistics.median(x):.1f} img/s (min {min(x):.1f}, max {max(x):.1f}) {[round(a, 1) for a in x]}")
print(f"new/old {statistics.median(res['new']) / statistics.median(res['old']):.2f}")
