"""`fastairl study`: every study of recipes/studies plans (recipes load, hashes are stable, evals come
after what they read), --print / --slurm, the skip-if-done logic and --collect on fabricated results
without training, and one --tiny study run end to end on real images."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fastairl.study import (HASH_IGNORED, StudyError, collect, config_hash, figure_series, load_study, main,
                            make_plan, records, run_plan, status, write_slurm)
from tiny_runs import REPO, one_line_error, run, small_folder

STUDIES = REPO / "recipes" / "studies"
ALL = sorted(p.stem for p in STUDIES.glob("*.yaml") if p.stem != "tiny")
PAPER = ["ladder", "crossover", "asymmetry", "aug_ablation", "longer_training", "overfitting", "subsampling",
         "taxonomy", "architectures", "normrescale_anchors"]


def plan_of(name: str, tmp_path, **kw):
    return make_plan(load_study(STUDIES / f"{name}.yaml"), out=str(tmp_path / "out"), **kw)


# ------------------------------------------------------------------------------------ plan resolution
def test_every_paper_study_is_there():
    assert sorted(PAPER) == ALL


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("tiny", [False, True])
def test_study_plans(name, tiny, tmp_path):
    """Every recipe loads (recipes, overrides, tiny overlay), ids are unique, each job comes after the
    jobs that make its inputs, and planning twice gives the same hashes."""
    plan = plan_of(name, tmp_path, tiny=tiny)
    study = plan.study
    ids = [j.id for j in plan.jobs]
    assert len(ids) == len(set(ids))
    assert sum(j.kind == "train" for j in plan.jobs) == len(study.runs) > 0
    assert sum(j.kind == "derive" for j in plan.jobs) == len(study.derived)
    made: set = set()
    for job in plan.jobs:
        assert all(p in made for p in job.inputs), f"{job.id} reads {job.inputs} before they are made"
        if job.kind == "train":
            made |= {job.out / "last.pt"} | {job.out / f"epoch_{e:03d}.pt" for e in range(1, 1000)}
        elif job.kind == "derive":
            made.add(job.out / "normrescaled.pt")
    for spec in study.evals:
        assert any(j.kind == "eval" and j.meta["eval"] == spec.id for j in plan.jobs)
    assert all(j.hash for j in plan.jobs if j.kind in ("train", "eval"))
    if not tiny:
        again = plan_of(name, tmp_path)
        assert [j.hash for j in plan.jobs] == [j.hash for j in again.jobs]
    if tiny:  # CPU-sized: small crops, the digits, few steps or few epochs
        for cfg in plan.configs.values():
            assert cfg.aug.crop_size == 32 and cfg.data.train.endswith("digits/train")
            assert cfg.train.max_steps or cfg.train.epochs <= 2
            assert cfg.model.arch in ("resnet10", "resnet18") or name == "architectures"


def test_paper_facts_in_the_plans(tmp_path):
    """Spot checks that the studies run what the paper says."""
    ladder = plan_of("ladder", tmp_path)
    assert [ladder.configs[r.id].method.symmetric for r in ladder.study.runs] == [False] * 4 + [True] * 2
    assert ladder.configs["complex_aug"].aug.preset == "byol_sym"
    cross = plan_of("crossover", tmp_path)
    protocol = {j.meta["source"]: j.argv[0] for j in cross.jobs if j.id.endswith("/linear")}
    assert protocol == {"mocov2plus_sgd": "recipes/linear_a.yaml", "byol_sgd": "recipes/linear_a.yaml",
                        "mocov2plus_lars": "recipes/linear_b.yaml", "byol_lars": "recipes/linear_b.yaml"}
    rescale = cross.job("derive/byol_lars_rescaled").argv
    assert rescale[:3] == [str(cross.out / "runs/byol_lars/last.pt"), "--anchor",
                           str(cross.out / "runs/byol_sgd/last.pt")]
    over = plan_of("overfitting", tmp_path)
    assert [j.meta["epoch"] for j in over.jobs if j.id.startswith("eval/mocov2plus_ep300/")] == [50, 100, 150, 200,
                                                                                                  250, 300]
    sub = plan_of("subsampling", tmp_path)
    assert [(c.data.class_fraction, c.train.keep_iterations) for c in sub.configs.values()] == \
        [(f, True) for f in (0.1, 0.2, 0.5, 0.7, 1.0)]
    assert [j.meta["epochs"] for j in sub.jobs if j.kind == "train"] == [2000, 1000, 400, 286, 200]
    tax = plan_of("taxonomy", tmp_path)
    assert [c.data.label_map for c in tax.configs.values()] == [
        None, "data/taxonomy/bottom_up_127.tsv", "data/taxonomy/bottom_up_79.tsv", "data/taxonomy/bottom_up_10.tsv",
        "data/taxonomy/bottom_up_2.tsv", "data/taxonomy/split_n00021939.tsv"]
    evals = [j for j in tax.jobs if j.kind == "eval"]
    assert all("label_map" not in " ".join(j.argv) for j in evals)  # linear eval on the original classes


def test_overrides_reach_runs_and_evals_inherit_their_data(tmp_path):
    plan = plan_of("asymmetry", tmp_path, run_overrides=["data.train=/ds/in/train", "data.val=/ds/in/val"],
                   eval_overrides=["eval.batch_size=512"])
    assert all(c.data.train == "/ds/in/train" for c in plan.configs.values())
    linear = plan.job("eval/byol_sgd/linear")
    assert "data.train=/ds/in/train" in linear.argv and linear.config["data"]["val"] == "/ds/in/val"
    lt = plan.job("eval/byol_sgd/c10lt_linear")  # data: recipe: CIFAR-10-LT, not the pretraining data
    assert lt.config["data"]["train"] == "data/cifar10_lt/train" and lt.config["eval"]["batch_size"] == 512
    tiny = plan_of("asymmetry", tmp_path, tiny=True)  # --tiny: the digits stand in for CIFAR-LT
    assert tiny.job("eval/byol_sgd/c10lt_linear").config["data"]["train"] == "data/digits/train"


def test_hash_ignores_how_and_follows_what(tmp_path):
    plan = plan_of("ladder", tmp_path)
    d = plan.job("train/mocov2").config
    changed = json.loads(json.dumps(d))
    for key in HASH_IGNORED:
        section, name = key.split(".")
        changed[section][name] = "anything"
    assert config_hash(changed) == config_hash(d)
    changed["optim"]["base_lr"] = 0.06
    assert config_hash(changed) != config_hash(d)
    other = plan_of("ladder", tmp_path, run_overrides=["optim.base_lr=0.06"])
    assert all(a.hash != b.hash for a, b in zip(plan.jobs, other.jobs) if a.kind == "train")
    assert all(a.hash == b.hash for a, b in zip(plan.jobs, other.jobs) if a.kind == "eval")


# ------------------------------------------------------------------------------ --print and --slurm
def test_print_commands(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main([str(STUDIES / "ladder.yaml"), "--print", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [line for line in lines if not line.startswith("#")]
    assert len(commands) == 12
    for train, ev in zip(commands[::2], commands[1::2]):
        assert train.startswith("accelerate launch fastairl/train.py recipes/") and train.endswith("--resume")
        run_dir = train.split("--run-dir ")[1].split()[0]
        assert ev.startswith("fastairl eval recipes/linear_a.yaml") and f"--checkpoint {run_dir}/last.pt" in ev
    assert "recipes/ladder/5_complex_aug.yaml" in commands[10]
    assert main([str(STUDIES / "ladder.yaml"), "--print", "--out", str(tmp_path), "--only", "train/*",
                 "--launcher", "accelerate launch --num_processes 8"]) == 0
    only = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(only) == 6 and all(c.startswith("accelerate launch --num_processes 8 fastairl/train.py") for c in only)


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_submits_and_runs_tasks(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    plan = plan_of("crossover", tmp_path)
    script = tmp_path / "crossover.sh"
    write_slurm(plan, script, "accelerate launch")
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    _fake(bin_dir, "sbatch", f'echo "sbatch $*" >> {calls}; echo $((1000 + $(wc -l < {calls})))\n')
    for tool in ("accelerate", "fastairl"):
        _fake(bin_dir, tool, f'echo "{tool} $*" >> {calls}\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")

    def bash(*args):
        calls.write_text("")
        subprocess.run(["bash", str(script), *args], env=env, check=True, capture_output=True, text=True)
        return calls.read_text().splitlines()

    submitted = bash()
    assert len(submitted) == 3
    assert "--array=0-3" in submitted[0] and "--gres=gpu:8" in submitted[0]
    assert "--array=0-3" in submitted[1] and "--dependency=aftercorr:1001" in submitted[1]
    assert "--dependency=afterok:1002" in submitted[2] and "final" in submitted[2]
    assert bash("train", "3") == [f"accelerate launch fastairl/train.py recipes/byol_lars.yaml --run-dir "
                                  f"{plan.out}/runs/byol_lars --resume"]
    evals = bash("eval", "3")  # byol_lars: linear (protocol B), linear_a, CIFAR-10-LT fine-tuning
    assert [c.split()[2] for c in evals] == ["recipes/linear_b.yaml", "recipes/linear_a.yaml",
                                             "recipes/transfer/cifar10lt_finetune.yaml"]
    done = plan.out / "evals" / "byol_lars" / "linear_a"
    done.mkdir(parents=True)
    (done / "summary.json").write_text("{}")
    assert len(bash("eval", "3")) == 2  # a finished evaluation is skipped
    final = bash("final")
    assert final[0].startswith("fastairl study recipes/studies/crossover.yaml") and final[0].endswith("--run")
    assert final[1].endswith("--collect") and f"--out {tmp_path / 'out'}" in final[1]


# ------------------------------------------------------------------------------------ skip if done
def fabricate(job, summary: dict, config: dict | None = None) -> None:
    """What a finished job leaves: config.yaml (train / eval) and summary.json."""
    job.out.mkdir(parents=True, exist_ok=True)
    if job.kind in ("train", "eval"):
        (job.out / "config.yaml").write_text(yaml.safe_dump(config or job.config, sort_keys=False))
    if job.kind == "train":
        (job.out / "last.pt").write_bytes(b"ckpt")
    if job.kind in ("derive", "analysis"):
        summary = {"command": ["fastairl", job.cmd, *job.argv], **summary}
        if job.kind == "derive":
            (job.out / "normrescaled.pt").write_bytes(b"ckpt")
    (job.out / "summary.json").write_text(json.dumps(summary))


def test_status_done_stale_resume(tmp_path):
    plan = plan_of("crossover", tmp_path)
    train, ev = plan.job("train/byol_sgd"), plan.job("eval/byol_sgd/linear")
    assert status(train) == status(ev) == "todo"
    fabricate(train, {"steps": 10})
    fabricate(ev, {"top1": 50.0})
    assert status(train) == status(ev) == "done"
    other = json.loads(json.dumps(train.config))
    other["optim"]["base_lr"] = 0.5
    fabricate(train, {"steps": 10}, other)
    assert status(train).startswith("stale") and "optim.base_lr: 0.5 -> 0.03" in status(train)
    fabricate(train, {"steps": 10})
    (train.out / "summary.json").unlink()
    assert status(train) == "resume"  # config.yaml of this config, no summary: continue it
    rescale = plan.job("derive/byol_lars_rescaled")
    fabricate(rescale, {})
    assert status(rescale) == "done"
    (rescale.out / "summary.json").write_text(json.dumps({"command": ["fastairl", "normrescale", "x"]}))
    assert status(rescale).startswith("stale") and "another command" in status(rescale)
    fabricate(train, {"steps": 10})
    os.utime(train.out / "last.pt", (2e9, 2e9))  # retrained after the evaluation
    assert status(ev).startswith("stale") and "newer than" in status(ev)


def test_run_skips_done_jobs_moves_stale_ones_and_stops_at_a_failure(tmp_path, monkeypatch):
    plan = plan_of("ladder", tmp_path)
    started, fail = [], {"eval/momentum/linear"}

    def fake_run(plan_, job, launcher):  # what a subprocess leaves behind
        started.append(job.id)
        if job.id in fail:
            return 1, 0.0
        fabricate(job, {"steps": 5} if job.kind == "train" else {"top1": 1.0})
        return 0, 0.0

    monkeypatch.setattr("fastairl.study._run_one", fake_run)
    (plan.out / "logs").mkdir(parents=True)
    (plan.out / "logs" / "eval__momentum__linear.log").write_text("Traceback: boom\n")
    fabricate(plan.job("train/mocov2"), {"steps": 5})
    assert run_plan(plan, say=lambda *a: None) == 1
    assert started == ["eval/mocov2/linear", "train/syncbn_projbn", "eval/syncbn_projbn/linear", "train/predictor",
                       "eval/predictor/linear", "train/momentum", "eval/momentum/linear"]
    started.clear()
    fail.clear()
    assert run_plan(plan, say=lambda *a: None) == 0
    assert started == ["eval/momentum/linear", "train/symmetric", "eval/symmetric/linear", "train/complex_aug",
                       "eval/complex_aug/linear"]
    started.clear()
    assert run_plan(plan, say=lambda *a: None) == 0 and started == []  # everything done: nothing starts
    changed = plan_of("ladder", tmp_path, run_overrides=["train.epochs=100"])
    with pytest.raises(StudyError, match=r"train/mocov2 is stale: .*train.epochs: 200 -> 100.*--rerun-stale"):
        run_plan(changed, say=lambda *a: None)
    assert run_plan(changed, rerun_stale=True, say=lambda *a: None) == 0
    assert (plan.out / "runs" / "mocov2.stale-1" / "summary.json").is_file()
    assert started[:2] == ["train/mocov2", "eval/mocov2/linear"]  # the eval read the old checkpoint: redone


# ------------------------------------------------------------------------------------------- collect
def test_collect_tables_csv_and_figure(tmp_path):
    plan = plan_of("crossover", tmp_path)
    acc = {"mocov2plus_sgd": 72.0, "mocov2plus_lars": 72.5, "byol_sgd": 72.1, "byol_lars": 72.4}
    for job in plan.jobs:
        if job.kind == "train":
            fabricate(job, {"steps": 100, "epochs": 200})
        elif job.kind == "eval" and job.meta["eval"] == "linear":
            fabricate(job, {"top1": acc[job.meta["source"]], "top5": 90.0})
    norms = {"per_kind": {"conv": {"total_norm": 80.0}, "bn_weight": {"total_norm": 20.0}}}
    fabricate(plan.job("analysis/norms"), {"outputs": ["norms.png"], "results": {
        "byol_sgd": norms,
        "byol_lars": {"per_kind": {"conv": {"total_norm": 800.0}, "bn_weight": {"total_norm": 210.0}}}}})
    out = []
    assert collect(plan, say=out.append) == 0
    md = (plan.out / "results" / "results.md").read_text()
    assert "| byol_lars | 800 | 210 |" in md and "[norms.png](../analyses/norms/norms.png)" in md  # Fig. 3a
    assert "| method \\ optimizer | SGD | LARS |" in md
    assert "| MoCo v2+ | 72.0 | 72.5 |" in md and "| BYOL | 72.1 | 72.4 |" in md
    assert "## Not finished" in md and "derive/byol_lars_rescaled" in md
    rows = (plan.out / "results" / "results.csv").read_text().splitlines()
    assert len(rows) == 5
    assert rows[0].startswith("source,label,method,optimizer,paper,train_steps,train_epochs,train_classes,eval")


def test_collect_figures_and_the_iteration_check(tmp_path):
    pytest.importorskip("matplotlib")
    plan = plan_of("subsampling", tmp_path / "sub")
    steps = {"frac10": 1000, "frac20": 1000, "frac50": 1010, "frac70": 990, "frac100": 1000}
    for job in plan.jobs:
        run_id = job.meta["source"]
        fabricate(job, {"steps": steps[run_id], "epochs": job.meta.get("epochs")} if job.kind == "train"
                  else {"top1": 50.0 + int(run_id[4:]) / 10})
    assert collect(plan, say=lambda *a: None) == 0
    res = plan.out / "results"
    assert (res / "fig8_subsampling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (res / "results.md").read_text()
    assert "same_iterations: ok" in md and "| 70 % | 70 | 286 | 990 | 57.0 |" in md
    fabricate(plan.job("train/frac70"), {"steps": 1200, "epochs": 286})
    assert collect(plan, say=lambda *a: None) == 1  # 20 % more iterations than the 100 % run
    assert "same_iterations: FAILED" in (res / "results.md").read_text()
    bars = plan_of("ladder", tmp_path / "ladder")
    for job in bars.jobs:
        fabricate(job, {"steps": 1} if job.kind == "train" else {"top1": 67.2})
    assert collect(bars, say=lambda *a: None) == 0 and (bars.out / "results" / "fig2_ladder.png").stat().st_size > 0


def test_figure_data_has_the_papers_shape(tmp_path):
    abl = plan_of("aug_ablation", tmp_path / "abl")  # Fig. 5: x = augmentations removed, one line per method
    for job in abl.jobs:
        fabricate(job, {"steps": 1} if job.kind == "train" else {"top1": 70.0 - len(job.meta["source"]) / 10})
    xs, numeric, points = figure_series(abl, records(abl), abl.study.figures[0])
    assert xs == ["none", "-solarize", "-blur", "-gray", "-jitter"] and not numeric
    assert list(points) == ["MoCo v2+", "S-MoCo v2+", "BYOL"] and all(len(p) == 5 for p in points.values())
    assert points["BYOL"]["-gray"] == 70.0 - len("byol_sgd_-gray") / 10
    longer = plan_of("longer_training", tmp_path / "longer")  # Fig. 6: numeric x = epochs, two lines
    for job in longer.jobs:
        fabricate(job, {"steps": 1} if job.kind == "train" else {"top1": 60.0})
    xs, numeric, points = figure_series(longer, records(longer), longer.study.figures[0])
    assert xs == [100, 200, 300, 500] and numeric and list(points) == ["MoCo v2+ (SGD)", "BYOL (LARS)"]


# ----------------------------------------------------------------------------------------- errors
def _study(tmp_path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text.replace("RECIPES", str(REPO / "recipes")))
    return path


@pytest.mark.parametrize("text, fragment", [
    ("runs: [{id: a, recipe: RECIPES/mocov2.yaml, recipes: x}]", "runs[0]: unknown key 'recipes'"),
    ("runs: [{id: a, recipe: RECIPES/nope.yaml}]", "run 'a': recipe not found"),
    ("runs: [{id: a, recipe: RECIPES/mocov2.yaml, overrides: {optim.lr: 1}}]", "unknown key 'optim.lr'"),
    ("runs: [{id: a, recipe: RECIPES/mocov2.yaml}]\nevals: [{id: e, recipe: RECIPES/knn.yaml, runs: [b]}]",
     "'e' refers to 'b', which is not a run"),
    ("runs: [{id: a, recipe: RECIPES/mocov2.yaml, overrides: {data.train: '{nope}/x'}}]", "unknown variable {nope}"),
    ("runs: [{id: a, recipe: RECIPES/mocov2.yaml}]\nchecks: {same_iterations: {}}",
     "same_iterations needs train.keep_iterations=true"),
])
def test_bad_study_files_give_one_line(tmp_path, capsys, text, fragment):
    assert main([str(_study(tmp_path, text)), "--print"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


# ------------------------------------------------------------------------------- one real tiny study
@pytest.mark.slow
def test_tiny_overfitting_study_end_to_end(digits_root, tmp_path, monkeypatch):
    """--tiny overfitting on real digits: 2 pretraining runs of 2 epochs with a checkpoint after each,
    every checkpoint evaluated (linear), then a second --run that skips all, then --collect."""
    data = tmp_path / "digits"
    small_folder(digits_root / "train", data / "train", per_class=8)
    small_folder(digits_root / "val", data / "val", per_class=4)
    cmd = [sys.executable, "-m", "fastairl.cli", "study", STUDIES / "overfitting.yaml", "--tiny", "--out", "st",
           f"data.train={data / 'train'}", f"data.val={data / 'val'}", "train.batch_size=8"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    proc = run(cmd + ["--run"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(": done in") == 6
    for run_id in ("mocov2plus_ep300", "byol_lars_ep300"):
        summary = json.loads((tmp_path / "st" / "runs" / run_id / "summary.json").read_text())
        assert summary["steps"] == 4 and summary["epochs"] == 2  # 2 classes x 8 images / batch 8, 2 epochs
        for e in (1, 2):
            ev = json.loads((tmp_path / "st" / "evals" / run_id / f"linear_epoch_{e:03d}" / "summary.json").read_text())
            assert ev["backbone"]["path"].endswith(f"epoch_{e:03d}.pt") and 0 <= ev["top1"] <= 100
    again = run(cmd + ["--run"], cwd=tmp_path, timeout=120)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 6
    col = run(cmd + ["--collect"], cwd=tmp_path, timeout=120)
    assert col.returncode == 0, col.stderr
    assert (tmp_path / "st" / "results" / "fig7_overfitting.png").stat().st_size > 0
    assert "MoCo v2+ (SGD) @ epoch_002" in (tmp_path / "st" / "results" / "results.md").read_text()


def test_a_failing_job_stops_the_study_and_shows_its_log(tmp_path):
    """A real subprocess that fails (the taxonomy tool, without its WordNet file): --run stops there,
    names the job and prints the tail of its log."""
    study = _study(tmp_path, "setup: [{id: maps, tool: taxonomy, creates: [m/report.json], args: [--classes, "
                             "c.txt, --is-a, missing_is_a.txt, --out, m]}]\n"
                             "runs: [{id: a, recipe: RECIPES/mocov2.yaml}]")
    proc = run([sys.executable, "-m", "fastairl.cli", "study", study, "--run", "--out", "st"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: --is-a: missing_is_a.txt does not exist" in proc.stdout
    assert "[1/2] setup/maps: FAILED (exit 2)" in proc.stdout and "st/logs/setup__maps.log" in proc.stdout


def test_cli_lists_study_and_taxonomy():
    proc = run([sys.executable, "-m", "fastairl.cli"], cwd=REPO, timeout=60)
    assert "study" in proc.stderr and "taxonomy" in proc.stderr
    err = run([sys.executable, "-m", "fastairl.cli", "study", "recipes/studies/none.yaml"], cwd=REPO, timeout=60)
    one_line_error(err, "study file not found: recipes/studies/none.yaml")
