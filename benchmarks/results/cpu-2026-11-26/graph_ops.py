"""Operators in the DALI train graph as built for a GPU (`gpu=True`, byol_sym, two views), by device
and kind, for a given pipelines/dali.py. Only the graph is traced (`Pipeline._build_graph`, a private
DALI 2.4 method): no GPU is needed.

    python graph_ops.py /tmp/old/pipelines/dali.py pipelines/dali.py
"""
import collections
import importlib.util
import sys

from fastairl.data.augment import make_spec


def count(path: str) -> tuple[collections.Counter, collections.Counter]:
    spec_ = importlib.util.spec_from_file_location(f"dali_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec_)
    sys.modules[spec_.name] = mod
    spec_.loader.exec_module(mod)
    views = make_spec("byol_sym", crop_size=224).views
    pipe = mod.train_pipeline(batches=lambda info: None, views=views, gpu=True, batch_size=4, num_threads=1,
                              device_id=0)
    pipe._build_graph()
    kinds = collections.Counter((op._op.device, type(op._op).__name__) for op in pipe._ops)
    devices = collections.Counter()
    for (device, _), n in kinds.items():
        devices[device] += n
    return devices, kinds


if __name__ == "__main__":
    for path in sys.argv[1:]:
        devices, kinds = count(path)
        print(f"{path}: {sum(devices.values())} operators {dict(devices)}")
        print("  " + ", ".join(f"{d}:{k} {n}" for (d, k), n in kinds.most_common()))
