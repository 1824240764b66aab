"""The train-step benchmark runs end to end and writes a complete report (never asserts on speed)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("byol_sgd", "mocov2plus")
SUMMARY_KEYS = ("fastairl_img_per_s", "bare_img_per_s", "overhead_ratio", "fastairl_step_s", "bare_step_s",
                "pipeline_img_per_s", "e2e_img_per_s", "data_wait_frac", "e2e_data_wait_s_per_step",
                "e2e_compute_s_per_step")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
def test_bench_step_quick(tmp_path):
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    out = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--quick",
                           "--methods", ",".join(METHODS), "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "corpus").is_dir()  # the corpus cache defaults to the folder of --out
    report = json.loads(out.read_text())

    env = report["environment"]
    for key in ("python", "torch", "torchvision", "accelerate", "cpu_model", "torch_threads", "cuda_available"):
        assert key in env, key
    assert env["torch_threads"] == 1  # --quick pins one thread
    params = report["params"]
    for key in ("arch", "crop", "batch", "steps", "warmup", "repeats", "workers", "threads", "device"):
        assert key in params, key
    assert params["quick"] is True and params["methods"] == list(METHODS)

    assert set(report["results"]) == set(METHODS) == set(report["configs"])
    for name, res in report["results"].items():
        for key in SUMMARY_KEYS:
            s = res[key]
            assert len(s["repeats"]) == params["repeats"], (name, key)
            assert all(_finite(v) for v in [s["median"], s["min"], s["max"], *s["repeats"]]), (name, key, s)
            assert s["min"] <= s["median"] <= s["max"], (name, key, s)
            if key != "data_wait_frac" and key != "e2e_data_wait_s_per_step":
                assert s["min"] > 0, (name, key, s)
        assert 0 <= res["data_wait_frac"]["min"] and res["data_wait_frac"]["max"] <= 1
        # the bare loop starts from the library's weights on the same batch: it computes the same loss
        first = res["first_step_loss"]
        assert _finite(first["fastairl"]) and first["fastairl"] > 0
        assert first["bare"] == pytest.approx(first["fastairl"], rel=1e-3, abs=1e-4)
        assert report["configs"][name]["resolved"]["method"]["bn"] == "plain"

    assert "bare/fastairl" in proc.stdout and "pipeline img/s" in proc.stdout  # the printed table


def test_bench_checkpoint_quick(tmp_path):
    """The checkpoint benchmark saves through the trainer's path: a real, verified checkpoint of the
    state it sized, every figure finite, and the first save's cost reported apart from the later ones."""
    out = tmp_path / "ckpt.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_checkpoint.py"), "--quick",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["environment"]["torch_threads"] == 1 and report["params"]["device"] == "cpu"
    res = report["results"]
    repeats = report["params"]["repeats"]
    for key in ("submit_s", "write_s", "img_per_s_during_write", "img_per_s_quiet", "slowdown", "overlap"):
        s = res[key]
        assert len(s["repeats"]) == repeats and all(_finite(v) and v > 0 for v in s["repeats"]), (key, s)
    assert _finite(res["first_submit_s"]) and res["first_submit_s"] > 0 and res["overlap"]["max"] <= 1
    # the `during` block holds the whole write: at least --steps steps, more while the write runs
    assert len(res["steps_per_block"]) == repeats and min(res["steps_per_block"]) >= report["params"]["steps"]
    # the file on disk holds the state measured (plus the config's text and the digest)
    assert 0.99 < res["checkpoint_file_mb"] / res["state_mb"] < 1.1, res
    assert not list(tmp_path.glob("ckpt_*"))  # the checkpoints' folder is removed


def _bench_pipeline(tmp_path, paths: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run bench_pipeline.py --quick on `paths`; every path is measured with finite, positive repeats."""
    out = tmp_path / "pipeline.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_pipeline.py"), "--quick",
                           "--paths", paths, "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["paths"]) == paths.split(",")
    for r in report["paths"].values():
        s = r["img_per_s"]
        assert len(s["repeats"]) == report["params"]["repeats"]
        assert all(_finite(v) and v > 0 for v in s["repeats"]) and s["min"] <= s["median"] <= s["max"]
        assert _finite(r["ratio_to_torch_pil"])
    return proc, report


@pytest.mark.slow
def test_bench_pipeline_quick(tmp_path):
    """Every requested path is measured (or recorded as skipped with the reason) in one report."""
    pytest.importorskip("skimage")
    pytest.importorskip("cv2")
    proc, report = _bench_pipeline(tmp_path, "torch_pil,torch_opencv,torch_device,opencv_device")
    for key in ("python", "torch", "cpu_model", "cpu_count", "torch_threads", "opencv", "pillow"):
        assert key in report["environment"], key
    assert report["environment"]["torch_threads"] == 1
    assert report["params"]["quick"] is True
    assert report["paths"]["torch_pil"]["ratio_to_torch_pil"] == 1.0
    assert report["paths"]["opencv_device"]["engine"] == "opencv" and report["paths"]["opencv_device"]["on_device"]
    assert "x torch_pil" in proc.stdout


@pytest.mark.slow
def test_bench_pipeline_ffcv_paths_quick(tmp_path):
    """The FFCV paths convert the same corpus and measure both colour-op placements on a CPU: the
    loader's OpenCV stage (the CPU default) and the on-device module run on the CPU."""
    pytest.importorskip("ffcv")
    pytest.importorskip("skimage")
    _, report = _bench_pipeline(tmp_path, "torch_pil,ffcv_opencv,ffcv_device")
    got = {name: (r["pipeline"], r["colour_ops"]) for name, r in report["paths"].items()}
    assert got == {"torch_pil": ("torch", "loader"), "ffcv_opencv": ("ffcv", "loader"),
                   "ffcv_device": ("ffcv", "on-device module")}


def test_dali_throughput_measures_only_the_paths_asked_for(tmp_path):
    """`--paths` (a GPU thread sweep leaves out the slow CPU reference): only those paths are timed and
    reported, with no ratio to a reference that was not run; an unknown path is one argparse error."""
    pytest.importorskip("nvidia.dali")
    pytest.importorskip("skimage")
    script = str(ROOT / "benchmarks" / "dali_throughput.py")
    out = tmp_path / "dali.json"
    proc = subprocess.run([sys.executable, script, "--quick", "--images", "40", "--rounds", "1",
                           "--paths", "dali_crops,dali_decode_once", "--out", str(out)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())  # in PATHS order: the full graph, then the crops alone
    assert list(report["images_per_s"]) == ["dali_decode_once", "dali_crops"] and report["ratio_to_torch_ref"] is None
    assert all(_finite(r["median"]) for r in report["images_per_s"].values())
    assert report["params"]["threads"] >= 1 and report["environment"]["dali"]
    bad = subprocess.run([sys.executable, script, "--paths", "dali_decode_once,torch", "--out", str(out)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "unknown --paths ['torch']" in bad.stderr
    # a sweep of the hardware decoder's share: one path per value, each recorded with its value
    # (and DALI's uint8 crops finished by the on-device module, named after the path)
    proc = subprocess.run([sys.executable, script, "--quick", "--images", "40", "--rounds", "1", "--paths",
                           "dali_device_aug,dali_decode_once", "--hw-decoder-load", "0.65,1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(out.read_text())["images_per_s"]
    assert list(got) == ["dali_decode_once@hw0.65", "dali_decode_once@hw1.0", "dali_device_aug@hw0.65",
                         "dali_device_aug@hw1.0"] and all(_finite(r["median"]) for r in got.values())
    for value in ("0.5,x", "1.5"):
        bad = subprocess.run([sys.executable, script, "--hw-decoder-load", value, "--out", str(out)],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert bad.returncode == 2 and "--hw-decoder-load takes" in bad.stderr, bad.stderr
