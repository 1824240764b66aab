"""`fastairl study recipes/studies/<name>.yaml`: one of the paper's studies as a grid of pretraining runs,
evaluations of their checkpoints and analyses, with the tables and figures they feed.

    fastairl study recipes/studies/ladder.yaml --print             # the launch commands, in order
    fastairl study recipes/studies/ladder.yaml --run               # run them here, skipping what is done
    fastairl study recipes/studies/ladder.yaml --slurm ladder.sh   # a SLURM submit script (bash ladder.sh)
    fastairl study recipes/studies/ladder.yaml --collect           # results.csv, results.md, figures
    fastairl study recipes/studies/ladder.yaml --tiny --run        # the same chain on the bundled digits, CPU
    fastairl study recipes/studies/ladder.yaml data.train=/ds/imagenet/train data.val=/ds/imagenet/val --run

A study file lists (paths relative to it):
  runs:      pretraining runs: id, recipe, overrides (a mapping or "key=value" strings), label, params
  derived:   checkpoints a tool makes from runs: id, tool: normrescale, from, anchor | factor, args
  evals:     id, recipe (an eval recipe), overrides, runs (default: every run and derived checkpoint),
             checkpoints: last | periodic (every train.ckpt_every_epochs), data: run | recipe, metric
  analyses:  id, tool: norms | cka | export, runs, args
  setup:     id, tool: taxonomy, args, creates: files that mean it is done
  vars:      names for {name} in overrides and args ({out}: the study's output folder, {study_dir}: the
             folder of the study file)
  tables, figures, checks: what --collect produces and verifies
  tiny:      the study's own --tiny changes on top of the shared overlay (recipes/studies/tiny.yaml):
             runs / evals overrides, analyses args, setup args, vars, checks, and keep: overlay keys
             that this study must not change (the factor it varies)

Overrides are applied in this order: recipe <- the entry's overrides <- tiny overlay <- the study's
tiny section <- the command line (`key=value` after the study file for runs, `--eval-set key=value` for
evals). An eval with `data: run` (the default) evaluates on the data its run trained on: it inherits
the run's data.source, data.train, data.val and data.pipeline (not class_fraction or label_map:
ImageNet linear evaluation uses all 1000 classes); `data: recipe` keeps the eval recipe's data
(CIFAR-LT). Under --tiny every eval uses its run's data (the digits stand in for CIFAR-LT).

Done or not: a pretraining run or evaluation is done when its summary.json exists and the resolved
config in its config.yaml hashes to the planned one (keys that change how, not what, are left out of
the hash: HASH_IGNORED); an evaluation must also be newer than its checkpoint. A tool's output is done
when its summary.json holds the planned command. A run dir with a config.yaml of another config is
"stale": --run stops and names the keys that differ, or with --rerun-stale moves it aside
(<dir>.stale-N) and starts again. Interrupted pretraining runs resume (every train line carries
--resume: train.resume=auto, which also starts afresh where there is nothing to resume).
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import Config, ConfigError, config_to_dict, load_config
from .schedules import run_length


class StudyError(ValueError):
    """A study file, its plan or its state is unusable; the message names the file / job and the fix."""


# config keys that change how a run goes, not what it computes: left out of the hash
HASH_IGNORED = ("train.resume", "train.progress", "train.out_dir", "train.run_name", "train.tensorboard",
                "train.log_every", "train.ckpt_every_minutes", "data.workers")
# what an eval with `data: run` takes from the run it evaluates
INHERITED_DATA = ("data.source", "data.train", "data.val", "data.pipeline")
TOOLS = {"derived": ("normrescale",), "analyses": ("norms", "cka", "export"), "setup": ("taxonomy",)}
TRAIN_PY = Path(__file__).resolve().parent / "train.py"


# ======================================================================================= study file
@dataclass
class RunSpec:
    id: str
    label: str
    params: dict
    recipe: Optional[Path] = None  # runs
    overrides: list[str] = field(default_factory=list)
    tool: Optional[str] = None  # derived
    source: Optional[str] = None
    anchor: Optional[str] = None
    factor: Optional[float] = None
    args: list[str] = field(default_factory=list)


@dataclass
class EvalSpec:
    id: str
    recipe: Path
    overrides: list[str]
    sources: Optional[list[str]]
    checkpoints: str
    data: str
    metric: Optional[str]
    label: str


@dataclass
class ToolSpec:
    id: str
    tool: str
    sources: list[str]
    args: list[str]
    creates: list[str]


@dataclass
class Study:
    name: str
    path: Path
    title: str
    runs: list[RunSpec]
    derived: list[RunSpec]
    evals: list[EvalSpec]
    analyses: list[ToolSpec]
    setup: list[ToolSpec]
    vars: dict
    tables: list[dict]
    figures: list[dict]
    checks: dict
    tiny: dict  # the study's own tiny section
    tiny_base: Path  # the shared tiny overlay

    def node(self, node_id: str) -> RunSpec:
        return {n.id: n for n in self.runs + self.derived}[node_id]


_KEYS = {
    "study": {"name", "title", "vars", "setup", "runs", "derived", "evals", "analyses", "tables", "figures",
              "checks", "tiny", "tiny_base"},
    "runs": {"id", "recipe", "overrides", "label", "params"},
    "derived": {"id", "tool", "from", "anchor", "factor", "args", "label", "params"},
    "evals": {"id", "recipe", "overrides", "runs", "checkpoints", "data", "metric", "label"},
    "analyses": {"id", "tool", "runs", "args"},
    "setup": {"id", "tool", "args", "creates"},
    "tiny": {"runs", "evals", "analyses", "setup", "vars", "checks", "keep"},
    "tables": {"title", "rows", "columns", "eval", "params"},
    "figures": {"file", "kind", "x", "series", "y", "metric", "title", "xlabel", "ylabel"},
}
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise StudyError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise StudyError(f"bad YAML in {path}{f' line {mark.line + 1}' if mark else ''}: "
                         f"{getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise StudyError(f"{path}: a {what} must be a mapping of keys")
    return data


def _check_keys(entry: Any, section: str, where: str) -> dict:
    if not isinstance(entry, dict):
        raise StudyError(f"{where}: must be a mapping with keys {', '.join(sorted(_KEYS[section]))}")
    unknown = sorted(set(entry) - _KEYS[section])
    if unknown:
        raise StudyError(f"{where}: unknown key '{unknown[0]}'; valid keys: {', '.join(sorted(_KEYS[section]))}")
    return entry


def overrides_of(value: Any, where: str) -> list[str]:
    """A mapping (nested or dotted keys) or a list of 'key=value' strings -> 'key=value' strings."""
    if value is None:
        return []
    if isinstance(value, list):
        bad = [v for v in value if not isinstance(v, str) or "=" not in v]
        if bad:
            raise StudyError(f"{where}: overrides must be 'key.sub=value' strings, got {bad[0]!r}")
        return list(value)
    if not isinstance(value, dict):
        raise StudyError(f"{where}: overrides must be a mapping or a list of 'key=value' strings")
    out = []
    for key, v in value.items():
        if isinstance(v, dict):
            out += [f"{key}.{ov}" for ov in overrides_of(v, where)]
        else:
            out.append(f"{key}={_yaml_value(v)}")
    return out


def _yaml_value(v: Any) -> str:
    """A value as the override parser (yaml.safe_load) reads it back unchanged."""
    if isinstance(v, str):
        plain = v != "" and not re.search(r"[\s:#{}\[\],&*!|>'\"%@`]", v)
        return v if plain and yaml.safe_load(v) == v else json.dumps(v)
    return json.dumps(v, separators=(",", ":"))


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise StudyError(f"{where}: must be a list of strings")
    return [str(v) for v in value]


def _entries(data: dict, section: str, path: Path) -> list[tuple[dict, str]]:
    items = data.get(section) or []
    if not isinstance(items, list):
        raise StudyError(f"{path}: '{section}' must be a list")
    out, seen = [], set()
    for i, entry in enumerate(items):
        where = f"{path}: {section}[{i}]"
        entry = _check_keys(entry, section, where)
        eid = entry.get("id")
        if not isinstance(eid, str) or not _ID.match(eid):
            raise StudyError(f"{where}: needs an 'id' of letters, digits and _.+- (got {eid!r})")
        key = (eid, tuple(entry.get("runs") or ())) if section == "evals" else eid
        if key in seen:
            raise StudyError(f"{where}: id '{eid}' is used twice in '{section}'")
        seen.add(key)
        out.append((entry, f"{path}: {section} '{eid}'"))
    return out


def load_study(path) -> Study:
    path = Path(path)
    data = _check_keys(_read_yaml(path, "study file"), "study", str(path))
    here = path.parent
    runs = [RunSpec(id=e["id"], label=str(e.get("label", e["id"])), params=dict(e.get("params") or {}),
                    recipe=here / _need(e, "recipe", where), overrides=overrides_of(e.get("overrides"), where))
            for e, where in _entries(data, "runs", path)]
    derived = [_derived(e, where) for e, where in _entries(data, "derived", path)]
    evals = [_eval(e, where, here) for e, where in _entries(data, "evals", path)]
    analyses = [_tool(e, where, "analyses") for e, where in _entries(data, "analyses", path)]
    setup = [_tool(e, where, "setup") for e, where in _entries(data, "setup", path)]
    study = Study(name=str(data.get("name", path.stem)), path=path, title=str(data.get("title", path.stem)),
                  runs=runs, derived=derived, evals=evals, analyses=analyses, setup=setup,
                  vars=dict(data.get("vars") or {}), tables=list(data.get("tables") or []),
                  figures=list(data.get("figures") or []), checks=dict(data.get("checks") or {}),
                  tiny=_check_keys(data.get("tiny") or {}, "tiny", f"{path}: tiny"),
                  tiny_base=here / data.get("tiny_base", "tiny.yaml"))
    _check_references(study)
    return study


def _need(entry: dict, key: str, where: str):
    if entry.get(key) in (None, ""):
        raise StudyError(f"{where}: needs '{key}'")
    return entry[key]


def _derived(e: dict, where: str) -> RunSpec:
    tool = _need(e, "tool", where)
    if tool not in TOOLS["derived"]:
        raise StudyError(f"{where}: tool '{tool}' is not one of {', '.join(TOOLS['derived'])}")
    if (e.get("anchor") is None) == (e.get("factor") is None):
        raise StudyError(f"{where}: normrescale needs exactly one of 'anchor' (a run id) or 'factor' (e.g. 0.1)")
    return RunSpec(id=e["id"], label=str(e.get("label", e["id"])), params=dict(e.get("params") or {}), tool=tool,
                   source=_need(e, "from", where), anchor=e.get("anchor"),
                   factor=float(e["factor"]) if e.get("factor") is not None else None,
                   args=_strings(e.get("args"), where + " args"))


def _eval(e: dict, where: str, here: Path) -> EvalSpec:
    checkpoints, data = e.get("checkpoints", "last"), e.get("data", "run")
    if checkpoints not in ("last", "periodic"):
        raise StudyError(f"{where}: checkpoints must be last or periodic, got {checkpoints!r}")
    if data not in ("run", "recipe"):
        raise StudyError(f"{where}: data must be run (the run's data) or recipe (the eval recipe's), got {data!r}")
    return EvalSpec(id=e["id"], recipe=here / _need(e, "recipe", where),
                    overrides=overrides_of(e.get("overrides"), where),
                    sources=_strings(e.get("runs"), where + " runs") or None, checkpoints=checkpoints, data=data,
                    metric=e.get("metric"), label=str(e.get("label", e["id"])))


def _tool(e: dict, where: str, section: str) -> ToolSpec:
    tool = _need(e, "tool", where)
    if tool not in TOOLS[section]:
        raise StudyError(f"{where}: tool '{tool}' is not one of {', '.join(TOOLS[section])}")
    sources = _strings(e.get("runs"), where + " runs")
    if section == "analyses" and not sources:
        raise StudyError(f"{where}: needs 'runs' (the ids of the checkpoints to analyse)")
    if tool == "cka" and len(sources) != 2:
        raise StudyError(f"{where}: cka compares two models; 'runs' has {len(sources)}")
    creates = _strings(e.get("creates"), where + " creates")
    if section == "setup" and not creates:
        raise StudyError(f"{where}: needs 'creates' (the files that show it is done)")
    return ToolSpec(id=e["id"], tool=tool, sources=sources, args=_strings(e.get("args"), where + " args"),
                    creates=creates)


def _check_references(study: Study) -> None:
    known = [n.id for n in study.runs]
    for d in study.derived:
        for ref in (d.source, d.anchor):
            if ref is not None and ref not in known:
                raise StudyError(f"{study.path}: derived '{d.id}' refers to '{ref}', which is not a run "
                                 f"(runs: {', '.join(known)})")
    known += [d.id for d in study.derived]
    if len(set(known)) != len(known):
        raise StudyError(f"{study.path}: runs and derived checkpoints need distinct ids")
    for spec in study.evals + study.analyses:
        for ref in spec.sources or ():
            if ref not in known:
                raise StudyError(f"{study.path}: '{spec.id}' refers to '{ref}', which is not a run or derived "
                                 f"checkpoint ({', '.join(known)})")
    eval_ids = {e.id for e in study.evals}
    for i, table in enumerate(study.tables):
        _check_keys(table, "tables", f"{study.path}: tables[{i}]")
        if bool(table.get("rows")) != bool(table.get("columns")) or table.get("eval", next(iter(eval_ids), None)) \
                not in eval_ids:
            raise StudyError(f"{study.path}: tables[{i}]: a pivot table needs both 'rows' and 'columns' (params), "
                             f"and 'eval' must be one of {', '.join(sorted(eval_ids))}")
    for i, fig in enumerate(study.figures):
        _check_keys(fig, "figures", f"{study.path}: figures[{i}]")
        ys = fig.get("y") if isinstance(fig.get("y"), list) else [fig.get("y")]
        if not fig.get("file") or any(y not in eval_ids for y in ys) or fig.get("kind", "bar") not in ("bar", "line"):
            raise StudyError(f"{study.path}: figures[{i}] needs a 'file', 'kind' bar or line, and 'y': eval id(s) "
                             f"among {', '.join(sorted(eval_ids))}")


# ============================================================================================ plan
@dataclass
class Job:
    id: str  # train/<run>, eval/<source>/<eval>[@epoch_XXX], derive/<id>, analysis/<id>[/<source>], setup/<id>
    kind: str  # setup | train | derive | eval | analysis
    cmd: str  # the fastairl subcommand
    argv: list[str]  # its arguments
    out: Path
    inputs: list[Path] = field(default_factory=list)  # files other jobs make
    hash: Optional[str] = None  # train / eval: the resolved config's hash
    config: Optional[dict] = None  # train / eval: the resolved config, as its config.yaml will hold it
    creates: list[Path] = field(default_factory=list)  # setup
    group: Optional[int] = None  # index of the run whose SLURM tasks run it
    meta: dict = field(default_factory=dict)  # source, eval, checkpoint, epoch: for --collect


@dataclass
class Plan:
    study: Study
    out: Path
    tiny: bool
    jobs: list[Job]
    configs: dict[str, Config]  # run id (and derived id: its source's) -> resolved config
    study_args: list[str]  # the command-line arguments that reproduce this plan (for SLURM's last job)
    checks: dict  # the study's checks, with the tiny section's

    def job(self, job_id: str) -> Job:
        return next(j for j in self.jobs if j.id == job_id)


def _tiny_overlay(study: Study) -> dict:
    base = _read_yaml(study.tiny_base, "tiny overlay (tiny_base)")
    _check_keys(base, "tiny", str(study.tiny_base))
    return base


def _filter_keep(overrides: list[str], keep: list[str]) -> list[str]:
    def kept(ov: str) -> bool:
        key = ov.split("=", 1)[0]
        return not any(key == k or key.startswith(k + ".") for k in keep)
    return [ov for ov in overrides if kept(ov)]


_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _substitute(items: list[str], variables: dict, where: str) -> list[str]:
    """{name} -> the variable's value, in every string (variables may refer to other variables)."""
    def one(m: re.Match) -> str:
        if m.group(1) not in variables:
            raise StudyError(f"{where}: unknown variable {{{m.group(1)}}}; define it under 'vars' "
                             f"(known: {', '.join(sorted(variables))})")
        return str(variables[m.group(1)])
    out = list(items)
    for _ in range(10):
        new = [_VAR.sub(one, s) for s in out]
        if new == out:
            return out
        out = new
    raise StudyError(f"{where}: the variables refer to each other in a loop ({', '.join(out)})")


def _substitute_overrides(overrides: list[str], variables: dict, where: str) -> list[str]:
    """Variables substituted in each value, which is then written the way the override parser reads it."""
    out = []
    for ov in overrides:
        key, text = ov.split("=", 1)
        new = _substitute([text], variables, where)[0]
        if new != text:
            value = yaml.safe_load(new)
            new = _yaml_value(value) if isinstance(value, str) else new
        out.append(f"{key}={new}")
    return out


def _display(path: Path) -> str:
    """A path relative to the working directory when it lies below it (shorter commands), else absolute."""
    rel = os.path.relpath(path)
    return str(Path(path).resolve()) if rel.split(os.sep)[0] == ".." else rel


def resolved(cfg: Config) -> dict:
    """The config as its config.yaml reads back (plain types: YAML's round trip is the identity on them)."""
    return config_to_dict(cfg)


def _read_config_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}


def hashed_view(d: dict) -> dict:
    """The config without HASH_IGNORED, its eval.checkpoint as an absolute path (--out rel/abs alike)."""
    d = json.loads(json.dumps(d))
    for key in HASH_IGNORED:
        section, name = key.split(".")
        d.get(section, {}).pop(name, None)
    ev = d.get("eval", {})
    if ev.get("checkpoint", "random") != "random":
        ev["checkpoint"] = os.path.abspath(ev["checkpoint"])
    return d


def config_hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(hashed_view(d), sort_keys=True).encode()).hexdigest()[:16]


def _load(recipe: Path, overrides: list[str], where: str) -> Config:
    try:
        return load_config(recipe, overrides)
    except ConfigError as e:
        raise StudyError(f"{where}: {e}") from None


def effective_epochs(cfg: Config) -> int:
    """train.epochs, scaled by 1 / class_fraction under train.keep_iterations (as the trainer does)."""
    return run_length(cfg.train.epochs, cfg.optim.warmup_epochs, cfg.data.class_fraction,
                      cfg.train.keep_iterations)[0]


def periodic_epochs(cfg: Config, where: str) -> list[int]:
    """The epochs of the epoch_XXX.pt files the run will leave."""
    t = cfg.train
    if t.ckpt_every_epochs <= 0 or t.max_steps or t.keep_last_k:
        raise StudyError(f"{where}: checkpoints: periodic needs train.ckpt_every_epochs > 0, train.max_steps=0 "
                         f"and train.keep_last_k=0 (got {t.ckpt_every_epochs}, {t.max_steps}, {t.keep_last_k})")
    return list(range(t.ckpt_every_epochs, effective_epochs(cfg) + 1, t.ckpt_every_epochs))


def _tiny_parts(study: Study) -> dict:
    """The shared overlay and the study's tiny section, merged (`keep` drops overlay keys)."""
    base, own = _tiny_overlay(study), study.tiny
    keep = _strings(own.get("keep"), f"{study.path}: tiny keep")
    where = f"{study.path}: tiny"
    return {"runs": _filter_keep(overrides_of(base.get("runs"), "tiny runs"), keep) +
            overrides_of(own.get("runs"), where),
            "evals": _filter_keep(overrides_of(base.get("evals"), "tiny evals"), keep) +
            overrides_of(own.get("evals"), where),
            "analyses": {**(base.get("analyses") or {}), **(own.get("analyses") or {})},
            "setup": own.get("setup") or {}, "vars": own.get("vars") or {}, "checks": own.get("checks") or {}}


def make_plan(study: Study, *, tiny: bool = False, out: Optional[str] = None, run_overrides: list[str] = (),
              eval_overrides: list[str] = ()) -> Plan:
    """Every job of the study, in the order --run runs them, with resolved configs and their hashes."""
    out_dir = Path(out) if out else Path("studies") / (study.name + ("-tiny" if tiny else ""))
    t = _tiny_parts(study) if tiny else {"runs": [], "evals": [], "analyses": {}, "setup": {}, "vars": {},
                                         "checks": {}}
    variables = {**study.vars, **t["vars"], "out": out_dir, "study_dir": _display(study.path.parent)}
    args = [_display(study.path), *run_overrides] + [f"--eval-set={e}" for e in eval_overrides] + \
        (["--tiny"] if tiny else []) + (["--out", out] if out else [])
    plan = Plan(study=study, out=out_dir, tiny=tiny, jobs=[], configs={}, study_args=args,
                checks={**study.checks, **t["checks"]})
    _plan_setup(plan, t["setup"], variables)
    for i, run in enumerate(study.runs):
        _plan_run(plan, run, i, t["runs"] + list(run_overrides), variables)
    for d in study.derived:
        _plan_derived(plan, d, t["analyses"].get(d.tool, []))
    for spec in study.evals:
        _plan_evals(plan, spec, t["evals"] + list(eval_overrides), variables)
    plan.jobs.sort(key=lambda j: _order(plan, j))
    for a in study.analyses:
        _plan_analysis(plan, a, t["analyses"].get(a.tool, []), variables)
    _check_plan(plan)
    return plan


def _order(plan: Plan, job: Job) -> tuple:
    """setup, then each run followed by its evals, then derived checkpoints each followed by theirs."""
    ids = [n.id for n in plan.study.runs + plan.study.derived]
    rank = {"setup": 0, "train": 1, "derive": 1, "eval": 2}
    if job.kind == "setup":
        return (0, 0, 0)
    src = job.meta["source"]
    return (1 + (src not in [r.id for r in plan.study.runs]), ids.index(src), rank[job.kind])


def _plan_setup(plan: Plan, tiny_args: dict, variables: dict) -> None:
    for s in plan.study.setup:
        where = f"{plan.study.path}: setup '{s.id}'"
        args = _substitute([str(a) for a in tiny_args.get(s.id, s.args)], variables, where)
        plan.jobs.append(Job(id=f"setup/{s.id}", kind="setup", cmd=s.tool, argv=args, out=Path(),
                             creates=[Path(p) for p in _substitute(s.creates, variables, where)],
                             meta={"source": None}))


def _plan_run(plan: Plan, run: RunSpec, index: int, extra: list[str], variables: dict) -> None:
    where = f"study {plan.study.name}, run '{run.id}'"
    overrides = _substitute_overrides(run.overrides + extra, variables, where)
    cfg = _load(run.recipe, overrides, where)
    plan.configs[run.id] = cfg
    out = plan.out / "runs" / run.id
    d = resolved(cfg)
    plan.jobs.append(Job(id=f"train/{run.id}", kind="train", cmd="train",
                         argv=[_display(run.recipe), *overrides, "--run-dir", str(out)], out=out,
                         hash=config_hash(d), config=d, group=index,
                         meta={"source": run.id, "epochs": effective_epochs(cfg)}))


def _checkpoint(plan: Plan, node_id: str) -> Path:
    if node_id in [r.id for r in plan.study.runs]:
        return plan.out / "runs" / node_id / "last.pt"
    return plan.out / "derived" / node_id / "normrescaled.pt"


def _plan_derived(plan: Plan, d: RunSpec, tiny_args: list[str]) -> None:
    out = plan.out / "derived" / d.id
    src = _checkpoint(plan, d.source)
    how = ["--anchor", str(_checkpoint(plan, d.anchor))] if d.anchor else ["--factor", str(d.factor)]
    plan.configs[d.id] = plan.configs[d.source]
    inputs = [src] + ([_checkpoint(plan, d.anchor)] if d.anchor else [])
    plan.jobs.append(Job(id=f"derive/{d.id}", kind="derive", cmd=d.tool,
                         argv=[str(src), *how, *d.args, *map(str, tiny_args), "--out", str(out)], out=out,
                         inputs=inputs, meta={"source": d.id}))


def _inherited(plan: Plan, spec: EvalSpec, source: str, eval_base: Config) -> list[str]:
    """data.* of the run, where it differs from the eval recipe's (so printed commands stay short)."""
    if spec.data == "recipe" and not plan.tiny:
        return []
    run_d, eval_d = config_to_dict(plan.configs[source]), config_to_dict(eval_base)
    out = []
    for key in INHERITED_DATA:
        section, name = key.split(".")
        if run_d[section][name] != eval_d[section][name]:
            out.append(f"{key}={_yaml_value(run_d[section][name])}")
    return out


def _plan_evals(plan: Plan, spec: EvalSpec, extra: list[str], variables: dict) -> None:
    where = f"study {plan.study.name}, eval '{spec.id}'"
    base = _load(spec.recipe, [], where)
    group = {r.id: i for i, r in enumerate(plan.study.runs)}
    for source in spec.sources or [n.id for n in plan.study.runs + plan.study.derived]:
        ckpts = [("last", _checkpoint(plan, source), plan.job(f"train/{_root_run(plan, source)}").meta["epochs"])]
        if spec.checkpoints == "periodic":
            if source not in group:
                raise StudyError(f"{where}: checkpoints: periodic needs pretraining runs; '{source}' is derived")
            run_dir = plan.out / "runs" / source
            ckpts = [(f"epoch_{e:03d}", run_dir / f"epoch_{e:03d}.pt", e)
                     for e in periodic_epochs(plan.configs[source], f"{where} on '{source}'")]
        overrides = _substitute_overrides(_inherited(plan, spec, source, base) + spec.overrides + extra, variables,
                                          where)
        for tag, ckpt, epoch in ckpts:
            suffix = "" if tag == "last" else f"@{tag}"
            out = plan.out / "evals" / source / (spec.id + ("" if tag == "last" else f"_{tag}"))
            cfg = _load(spec.recipe, overrides + [f"eval.checkpoint={ckpt}"], f"{where} on '{source}'")
            d = resolved(cfg)
            plan.jobs.append(Job(id=f"eval/{source}/{spec.id}{suffix}", kind="eval", cmd="eval",
                                 argv=[_display(spec.recipe), *overrides, "--checkpoint", str(ckpt), "--run-dir",
                                       str(out)], out=out, inputs=[ckpt], hash=config_hash(d), config=d,
                                 group=group.get(source),
                                 meta={"source": source, "eval": spec.id, "checkpoint": tag, "epoch": epoch}))


def _root_run(plan: Plan, node_id: str) -> str:
    while node_id not in [r.id for r in plan.study.runs]:
        node_id = plan.study.node(node_id).source
    return node_id


def _plan_analysis(plan: Plan, a: ToolSpec, tiny_args: list[str], variables: dict) -> None:
    where = f"{plan.study.path}: analysis '{a.id}'"
    args = _substitute(a.args + [str(x) for x in tiny_args], variables, where)
    ckpts = [_checkpoint(plan, s) for s in a.sources]
    if a.tool == "export":  # one export per checkpoint
        for s, ckpt in zip(a.sources, ckpts):
            out = plan.out / "analyses" / a.id / s
            plan.jobs.append(Job(id=f"analysis/{a.id}/{s}", kind="analysis", cmd="export",
                                 argv=[str(ckpt), *args, "--out", str(out)], out=out, inputs=[ckpt],
                                 meta={"source": None, "analysis": a.id}))
        return
    out = plan.out / "analyses" / a.id
    plan.jobs.append(Job(id=f"analysis/{a.id}", kind="analysis", cmd=a.tool,
                         argv=[*map(str, ckpts), "--labels", ",".join(a.sources), *args, "--out", str(out)],
                         out=out, inputs=ckpts, meta={"source": None, "analysis": a.id}))


def _check_plan(plan: Plan) -> None:
    ids = [j.id for j in plan.jobs]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise StudyError(f"{plan.study.path}: job {twice[0]} is planned twice (two evals with one id and a "
                         f"common run?); give them different ids or disjoint 'runs'")
    unknown = sorted(set(plan.checks) - {"same_iterations"})
    if unknown:
        raise StudyError(f"{plan.study.path}: unknown check '{unknown[0]}'; known: same_iterations")
    check = plan.checks.get("same_iterations")
    if check is not None:
        cfgs = {r.id: plan.configs[r.id] for r in plan.study.runs}
        bad = [i for i, c in cfgs.items() if not c.train.keep_iterations]
        if bad:
            raise StudyError(f"study {plan.study.name}: check same_iterations needs train.keep_iterations=true "
                             f"for every run (not set: {', '.join(bad)})")
        sig = {(c.train.epochs, c.train.batch_size, c.train.max_steps) for c in cfgs.values()}
        if len(sig) > 1:
            raise StudyError(f"study {plan.study.name}: check same_iterations needs one train.epochs, "
                             f"train.batch_size and train.max_steps for every run, got {sorted(sig)}")


# ========================================================================================== status
def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def status(job: Job) -> str:
    """done | todo | resume (a pretraining run that stopped) | stale: <why>."""
    if job.kind == "setup":
        return "done" if job.creates and all(p.exists() for p in job.creates) else "todo"
    summary = job.out / "summary.json"
    if job.kind in ("train", "eval"):
        recorded = job.out / "config.yaml"
        if recorded.is_file():
            old = _read_config_yaml(recorded)
            if config_hash(old) != job.hash:
                diff = _diff(hashed_view(old), hashed_view(job.config))
                return f"stale: {recorded} holds another config ({'; '.join(diff[:3])})"
        if not summary.is_file():
            return "resume" if job.kind == "train" and recorded.is_file() else "todo"
        return _newer_than_inputs(job, summary)
    if not summary.is_file():
        return "todo"
    recorded_cmd = (_read_json(summary) or {}).get("command")
    if _norm_args(recorded_cmd or []) != _norm_args(["fastairl", job.cmd, *job.argv]):
        return f"stale: {summary} was made by another command ({shlex.join(recorded_cmd or ['?'])})"
    return _newer_than_inputs(job, summary)


def _norm_args(cmd: list[str]) -> list[str]:
    """Arguments naming existing files or folders as absolute paths: relative and absolute --out alike."""
    return [os.path.abspath(a) if os.path.exists(a) else a for a in cmd]


def _newer_than_inputs(job: Job, summary: Path) -> str:
    newer = [p for p in job.inputs if p.is_file() and p.stat().st_mtime > summary.stat().st_mtime]
    return f"stale: {newer[0]} is newer than {summary}" if newer else "done"


# ========================================================================================= commands
def _train_py() -> str:
    return _display(TRAIN_PY)


def shell_command(job: Job, launcher: str) -> list[str]:
    """The command a user (or a SLURM task) runs."""
    if job.kind == "train":
        return [*shlex.split(launcher), _train_py(), *job.argv, "--resume"]
    return ["fastairl", job.cmd, *job.argv]


def local_command(job: Job, launcher: str) -> list[str]:
    """The command --run starts: this Python for one process, else the given launcher."""
    if job.kind == "train":
        head = [sys.executable] if launcher == "python" else shlex.split(launcher)
        return [*head, str(TRAIN_PY), *job.argv, "--resume"]
    return [sys.executable, "-m", "fastairl.cli", job.cmd, *job.argv]


def _selected(plan: Plan, only: Optional[list[str]]) -> list[Job]:
    if not only:
        return plan.jobs
    jobs = [j for j in plan.jobs if any(fnmatch.fnmatchcase(j.id, p) for p in only)]
    if not jobs:
        raise StudyError(f"--only {' '.join(only)} matches no job; job ids look like "
                         f"{', '.join(j.id for j in plan.jobs[:3])}")
    return jobs


def print_commands(plan: Plan, launcher: str, only: Optional[list[str]] = None, file=None) -> None:
    file = file or sys.stdout
    jobs = _selected(plan, only)
    states = {j.id: status(j) for j in jobs}
    done = sum(s == "done" for s in states.values())
    print(f"# study {plan.study.name} ({_display(plan.study.path)}{', tiny' if plan.tiny else ''}): "
          f"{len(jobs)} jobs, {done} done; outputs in {plan.out}", file=file)
    for job in jobs:
        print(f"# {job.id}" + ("" if states[job.id] == "todo" else f"  [{states[job.id]}]"), file=file)
        print(shlex.join(shell_command(job, launcher)), file=file)


def print_status(plan: Plan, only: Optional[list[str]] = None) -> None:
    jobs = _selected(plan, only)
    width = max(len(j.id) for j in jobs)
    for job in jobs:
        print(f"{job.id:<{width}}  {status(job)}")


# ============================================================================================== run
def _log_path(plan: Plan, job: Job) -> Path:
    return plan.out / "logs" / (job.id.replace("/", "__").replace("@", "_") + ".log")


def _move_aside(path: Path) -> Path:
    n = 1
    while path.with_name(f"{path.name}.stale-{n}").exists():
        n += 1
    target = path.with_name(f"{path.name}.stale-{n}")
    os.rename(path, target)
    return target


def run_plan(plan: Plan, launcher: str = "python", only: Optional[list[str]] = None, rerun_stale: bool = False,
             say=print) -> int:
    """Run every job that is not done, in order, as subprocesses; stop at the first failure."""
    jobs = _selected(plan, only)
    stale = [(j, s) for j in jobs if (s := status(j)).startswith("stale")]
    if stale and not rerun_stale:  # (a job that turns stale because this run remade its input is redone)
        job, why = stale[0]
        raise StudyError(f"{job.id} is {why}; delete {job.out}, or pass --rerun-stale to move it aside and "
                         f"run it again ({len(stale)} stale job(s))")
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "plan.json").write_text(json.dumps(plan_summary(plan), indent=2) + "\n")
    for n, job in enumerate(jobs, 1):
        state = status(job)
        if state == "done":
            say(f"[{n}/{len(jobs)}] {job.id}: done, skipped")
            continue
        if state.startswith("stale"):
            say(f"[{n}/{len(jobs)}] {job.id}: {state}; moved to {_move_aside(job.out)}")
        missing = [p for p in job.inputs if not p.is_file()]
        if missing:
            raise StudyError(f"{job.id} needs {missing[0]}, which does not exist: run the job that makes it "
                             f"first (without --only, or --only matching it)")
        rc, seconds = _run_one(plan, job, launcher)
        if rc != 0:
            log = _log_path(plan, job)
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            say(f"{tail}\n[{n}/{len(jobs)}] {job.id}: FAILED (exit {rc}) after {seconds:.1f} s; full log: {log}")
            return rc
        if status(job) != "done":
            raise StudyError(f"{job.id} exited 0 but is not done ({status(job)}); see {_log_path(plan, job)}")
        say(f"[{n}/{len(jobs)}] {job.id}: done in {seconds:.1f} s")
    return 0


def _run_one(plan: Plan, job: Job, launcher: str) -> tuple[int, float]:
    log = _log_path(plan, job)
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = local_command(job, launcher)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(argv) + "\n")
        f.flush()
        rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    return rc, time.perf_counter() - t0


def plan_summary(plan: Plan) -> dict:
    return {"study": plan.study.name, "file": str(plan.study.path), "tiny": plan.tiny, "out": str(plan.out),
            "jobs": [{"id": j.id, "command": shell_command(j, "accelerate launch"), "out": str(j.out),
                      "hash": j.hash} for j in plan.jobs]}


# ============================================================================================ slurm
SLURM_TEMPLATE = """#!/bin/bash
# fastairl study {name}: SLURM jobs, written by `fastairl study {study_args} --slurm {file}`.
#   bash {file}            submits: an array of {n} pretraining tasks (one per run), an array of {n}
#                          evaluation tasks (task i starts when pretraining task i succeeded: aftercorr),
#                          then one job for the rest (derived checkpoints, their evaluations, analyses)
#                          and --collect, once every evaluation task succeeded.
#   bash {file} train I    what pretraining task I runs (eval I, final: likewise); also usable by hand.
# Set the resources and the launcher below for your cluster.
set -euo pipefail
cd {cwd}
SBATCH_TRAIN=${{SBATCH_TRAIN:-"--nodes=1 --gres=gpu:8 --cpus-per-task=64 --time=3-00:00:00"}}
SBATCH_EVAL=${{SBATCH_EVAL:-"--nodes=1 --gres=gpu:1 --cpus-per-task=16 --time=1-00:00:00"}}
SBATCH_FINAL=${{SBATCH_FINAL:-"--nodes=1 --gres=gpu:1 --cpus-per-task=16 --time=1-00:00:00"}}
LAUNCH=${{LAUNCH:-"{launcher}"}}
SCRIPT=$(readlink -f "${{BASH_SOURCE[0]}}")
LOGS={logs}

train_task() {{
  case "$1" in
{train_cases}
    *) echo "no pretraining task $1 (0..{last})" >&2; exit 2 ;;
  esac
}}

eval_task() {{
  case "$1" in
{eval_cases}
    *) echo "no evaluation task $1 (0..{last})" >&2; exit 2 ;;
  esac
}}

final_task() {{
  fastairl study {study_args} --run
  fastairl study {study_args} --collect
}}

case "${{1:-submit}}" in
  submit)
    mkdir -p "$LOGS"
    train=$(sbatch --parsable --array=0-{last} $SBATCH_TRAIN --job-name={name}-train \\
      --output="$LOGS/slurm-train-%a.out" --wrap="bash $SCRIPT train \\$SLURM_ARRAY_TASK_ID")
    evals=$(sbatch --parsable --array=0-{last} $SBATCH_EVAL --job-name={name}-eval \\
      --dependency=aftercorr:$train --output="$LOGS/slurm-eval-%a.out" \\
      --wrap="bash $SCRIPT eval \\$SLURM_ARRAY_TASK_ID")
    final=$(sbatch --parsable $SBATCH_FINAL --job-name={name}-final --dependency=afterok:$evals \\
      --output="$LOGS/slurm-final.out" --wrap="bash $SCRIPT final")
    echo "submitted: pretraining $train, evaluations $evals, final $final"
    ;;
  train) train_task "$2" ;;
  eval) eval_task "$2" ;;
  final) final_task ;;
  *) echo "usage: bash $SCRIPT [submit | train I | eval I | final]" >&2; exit 2 ;;
esac
"""


def _guarded(job: Job) -> str:
    """A job's line in a task: skipped when its summary.json exists (the final --run checks hashes)."""
    command = shlex.join(shell_command(job, "LAUNCH_PLACEHOLDER"))
    command = command.replace("LAUNCH_PLACEHOLDER", "$LAUNCH")
    return f"[ -f {shlex.quote(str(job.out / 'summary.json'))} ] || {command}"


def write_slurm(plan: Plan, path: Path, launcher: str) -> None:
    n = len(plan.study.runs)
    if n == 0:
        raise StudyError(f"study {plan.study.name} has no runs to submit")
    train_cases, eval_cases = [], []
    for i, run in enumerate(plan.study.runs):
        train = [j for j in plan.jobs if j.kind == "train" and j.group == i]
        evals = [j for j in plan.jobs if j.kind == "eval" and j.group == i]
        train_cases.append(_case(i, run.id, [_guarded(j) for j in train]))
        eval_cases.append(_case(i, run.id, [_guarded(j) for j in evals] or [":"]))
    args = shlex.join(plan.study_args)
    path.write_text(SLURM_TEMPLATE.format(
        name=plan.study.name, study_args=args, file=path.name, n=n, last=n - 1, cwd=shlex.quote(os.getcwd()),
        launcher=launcher, logs=shlex.quote(str(plan.out / "logs")), train_cases="\n".join(train_cases),
        eval_cases="\n".join(eval_cases)))
    path.chmod(0o755)


def _case(i: int, run_id: str, lines: list[str]) -> str:
    body = "\n".join(f"      {line}" for line in lines)
    return f"    {i})  # {run_id}\n{body}\n      ;;"


# ========================================================================================== collect
def _flat_metrics(summary: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in summary.items():
        if isinstance(v, dict):
            out.update(_flat_metrics(v, f"{prefix}{k}_"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def main_metric(spec: EvalSpec, metrics: dict) -> Optional[str]:
    """The eval's `metric`, else top1, else the kNN accuracy at the first k."""
    if spec.metric:
        return spec.metric.replace(".", "_")
    if "top1" in metrics:
        return "top1"
    return next((k for k in metrics if k.startswith("knn_top1_")), None)


def records(plan: Plan) -> list[dict]:
    """One row per finished evaluation: the source's label and params, its run's steps and epochs, the
    checkpoint, `value` (the eval's main metric) and every metric of its summary.json."""
    specs = {e.id: e for e in plan.study.evals}
    rows = []
    for job in plan.jobs:
        if job.kind != "eval" or status(job) != "done":
            continue
        node = plan.study.node(job.meta["source"])
        metrics = _flat_metrics(_read_json(job.out / "summary.json") or {})
        metric = main_metric(specs[job.meta["eval"]], metrics)
        rows.append({"source": node.id, "label": node.label, **node.params, **_run_info(plan, node.id),
                     "eval": job.meta["eval"], "checkpoint": job.meta["checkpoint"], "epoch": job.meta["epoch"],
                     "metric": metric, "value": metrics.get(metric), **metrics})
    return rows


def _run_info(plan: Plan, node_id: str) -> dict:
    """train_steps, train_epochs (its summary.json) and train_classes (its classes.txt) of the pretraining
    run behind a checkpoint."""
    run_dir = plan.out / "runs" / _root_run(plan, node_id)
    s = _read_json(run_dir / "summary.json") or {}
    classes = run_dir / "classes.txt"
    n = sum(1 for line in classes.read_text().splitlines() if line.strip()) if classes.is_file() else None
    return {"train_steps": s.get("steps"), "train_epochs": s.get("epochs"), "train_classes": n}


def _fmt(v: Any) -> str:
    if v is None or v == "":
        return "—"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def _param_names(plan: Plan) -> list[str]:
    names: list[str] = []
    for node in plan.study.runs + plan.study.derived:
        names += [k for k in node.params if k not in names]
    return names


def wide_table(plan: Plan, rows: list[dict], spec: dict) -> list[list[str]]:
    """Rows: each source (and checkpoint) in study order; columns: label, params (or `params`, which may
    also name train_steps / train_epochs / train_classes), then each eval's main metric (evals sharing an
    id share a column)."""
    evals = {e.id: e.label for e in reversed(plan.study.evals) if spec.get("eval") in (None, e.id)}
    evals = dict(reversed(evals.items()))  # first label of each id, in study order
    params = spec.get("params", _param_names(plan))
    keys = list(dict.fromkeys((j.meta["source"], j.meta["checkpoint"]) for j in plan.jobs
                              if j.kind == "eval" and j.meta["eval"] in evals))
    cells = {(r["source"], r["checkpoint"], r["eval"]): r["value"] for r in rows}
    table = [["run", *params, *evals.values()]]
    for source, ckpt in keys:
        node, info = plan.study.node(source), _run_info(plan, source)
        name = node.label + ("" if ckpt == "last" else f" @ {ckpt}")
        table.append([name, *(_fmt(node.params.get(p, info.get(p))) for p in params),
                      *(_fmt(cells.get((source, ckpt, e))) for e in evals)])
    return table


def pivot_table(plan: Plan, rows: list[dict], spec: dict) -> list[list[str]]:
    """Rows and columns: two params (e.g. method x optimizer); cells: one eval's main metric."""
    r_key, c_key, eval_id = spec["rows"], spec["columns"], spec.get("eval")
    evaluated = {j.meta["source"] for j in plan.jobs if j.kind == "eval" and eval_id in (None, j.meta["eval"])}
    nodes = [n for n in plan.study.runs + plan.study.derived if n.id in evaluated]
    r_vals = list(dict.fromkeys(str(n.params[r_key]) for n in nodes if r_key in n.params))
    c_vals = list(dict.fromkeys(str(n.params[c_key]) for n in nodes if c_key in n.params))
    cell = {(str(r.get(r_key)), str(r.get(c_key))): r["value"] for r in rows
            if eval_id in (None, r["eval"]) and r["checkpoint"] == "last"}
    return [[f"{r_key} \\ {c_key}", *c_vals]] + [[rv, *(_fmt(cell.get((rv, cv))) for cv in c_vals)] for rv in r_vals]


def markdown(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in table[1:]])


def check_same_iterations(plan: Plan, tolerance: float) -> tuple[bool, str]:
    """Every run's summary.json `steps` within `tolerance` (relative) of the largest class fraction's."""
    steps = {}
    for run in plan.study.runs:
        s = _read_json(plan.out / "runs" / run.id / "summary.json")
        if s is not None:
            steps[run.id] = s["steps"]
    if not steps:
        return True, "same_iterations: no finished run yet"
    ref_id = max(steps, key=lambda i: plan.configs[i].data.class_fraction)
    dev = {i: abs(s - steps[ref_id]) / steps[ref_id] for i, s in steps.items()}
    worst = max(dev, key=dev.get)
    ok = dev[worst] <= tolerance
    detail = ", ".join(f"{i} {s}" for i, s in steps.items())
    return ok, (f"same_iterations: {'ok' if ok else 'FAILED'}: steps {detail}; largest deviation from "
                f"{ref_id}: {100 * dev[worst]:.1f} % ({worst}), tolerance {100 * tolerance:.1f} %")


def collect(plan: Plan, say=print) -> int:
    """results.csv (one row per finished evaluation), results.md (the study's tables, checks, analyses,
    what is missing) and the figures, under <out>/results/. Returns 1 when a check fails."""
    res = plan.out / "results"
    res.mkdir(parents=True, exist_ok=True)
    rows = records(plan)
    _write_csv(res / "results.csv", rows)
    md = [f"# {plan.study.title}", "", f"Study file `{_display(plan.study.path)}`"
          f"{' (--tiny: plumbing check on the bundled digits, numbers mean nothing)' if plan.tiny else ''}; "
          f"{len(rows)} finished evaluation(s).", ""]
    for spec in plan.study.tables or [{}]:
        table = pivot_table(plan, rows, spec) if spec.get("columns") else wide_table(plan, rows, spec)
        md += [f"## {spec.get('title', 'Results')}", "", markdown(table), ""]
    ok = True
    for name, spec in plan.checks.items():
        passed, line = check_same_iterations(plan, float((spec or {}).get("tolerance", 0.02)))
        ok &= passed
        md += ["## Checks", "", line, ""]
        say(line)
    md += _analyses_md(plan, res)
    for fig in plan.study.figures:
        written = draw_figure(plan, rows, fig, res, say)
        if written:
            md += [f"![{fig.get('title', fig['file'])}]({written.name})", ""]
    missing = [j.id for j in plan.jobs if status(j) != "done"]
    if missing:
        md += ["## Not finished", "", ", ".join(missing), ""]
    (res / "results.md").write_text("\n".join(md))
    say("\n".join(md))
    say(f"wrote {res / 'results.csv'}, {res / 'results.md'}")
    return 0 if ok else 1


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields or ["source"])
        w.writeheader()
        w.writerows(rows)


def _analyses_md(plan: Plan, res: Path) -> list[str]:
    jobs = [j for j in plan.jobs if j.kind in ("analysis", "derive")]
    if not jobs:
        return []
    md = ["## Analyses and derived checkpoints", ""]
    for job in jobs:
        summary = _read_json(job.out / "summary.json") if status(job) == "done" else None
        if summary is None:
            md.append(f"- {job.id}: not finished")
            continue
        files = [f"[{o}]({os.path.relpath(job.out / o, res)})" for o in summary.get("outputs", [])]
        md.append(f"- {job.id}: {', '.join(files) or 'done'}")
        md += _analysis_numbers(job.cmd, summary.get("results") or {})
    return md + [""]


def _analysis_numbers(tool: str, results: dict) -> list[str]:
    """The numbers of Fig. 3: total weight norm per kind and model (norms), CKA per layer (cka)."""
    if tool == "norms":
        kinds = list(dict.fromkeys(k for r in results.values() for k in r.get("per_kind", {})))
        table = [["model", *(f"{k} norm" for k in kinds)]] + \
            [[label, *(f"{r['per_kind'][k]['total_norm']:.4g}" if k in r.get("per_kind", {}) else "—" for k in kinds)]
             for label, r in results.items()]
        return ["", *("  " + line for line in markdown(table).splitlines()), ""]
    if tool == "cka":
        return ["  CKA per layer: " + ", ".join(f"{layer} {v['cka']:.3f}" for layer, v in results.items())]
    return []


# ========================================================================================== figures
def _x_value(row: dict, x: str, plan: Plan) -> Any:
    if x == "source":
        return row["label"]
    if x == "eval":
        return next(e.label for e in plan.study.evals if e.id == row["eval"])
    return row.get(x)


def figure_series(plan: Plan, rows: list[dict], fig_spec: dict) -> tuple[list, bool, dict]:
    """(x values in axis order, whether the axis is numeric, {series: {x: value}}) of a figure spec."""
    ys = fig_spec["y"] if isinstance(fig_spec["y"], list) else [fig_spec["y"]]
    x, series = fig_spec.get("x", "source"), fig_spec.get("series")
    chosen = [r for r in rows if r["eval"] in ys and r["value"] is not None]
    xs = list(dict.fromkeys(_x_value(r, x, plan) for r in chosen))
    numeric = fig_spec.get("kind", "bar") == "line" and all(isinstance(v, (int, float)) for v in xs)
    points: dict = {}
    for r in chosen:
        points.setdefault(_x_value(r, series, plan) if series else None, {})[_x_value(r, x, plan)] = r["value"]
    return (sorted(xs) if numeric else xs), numeric, points


def draw_figure(plan: Plan, rows: list[dict], fig_spec: dict, res: Path, say=print) -> Optional[Path]:
    """kind bar (grouped bars with value labels: Fig. 2, 4) or line (Fig. 5-8); x = source | eval |
    epoch | a param; series = the same choices; y = eval id(s), their main metric. <res>/<file>.png"""
    from .extras import MissingExtra, require

    try:
        mpl_figure, ticker = require("plot", "matplotlib.figure"), require("plot", "matplotlib.ticker")
    except MissingExtra as e:
        say(f"warning: figure {fig_spec['file']} skipped ({e})")
        return None
    xs, numeric, points = figure_series(plan, rows, fig_spec)
    fig = mpl_figure.Figure(figsize=(max(5.0, 0.9 * len(xs) + 2), 3.6), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(len(points), 1)
    for i, (group, pts) in enumerate(points.items()):
        keys = [v for v in xs if v in pts]
        pos = keys if numeric else [xs.index(v) for v in keys]
        label = None if group is None else str(group)
        if fig_spec.get("kind", "bar") == "bar":
            bars = ax.bar([p - 0.4 + width * (i + 0.5) for p in pos], [pts[k] for k in keys], width, label=label)
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
        else:
            ax.plot(pos, [pts[k] for k in keys], marker="o", label=label)
    if numeric and all(float(v).is_integer() for v in xs):
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    elif not numeric:
        slant = len(xs) > 4
        names = [str(v) if slant else textwrap.fill(str(v), 16) for v in xs]
        ax.set_xticks(range(len(xs)), names, rotation=20 if slant else 0, ha="right" if slant else "center")
    values = [v for pts in points.values() for v in pts.values()]
    if fig_spec.get("kind", "bar") == "bar" and values:  # zoom on the differences, as the paper's bar charts do
        span = max(values) - min(values)
        ax.set_ylim(max(0.0, min(values) - 0.5 * span - 1), max(values) + 0.3 * span + 1)
    x = fig_spec.get("x", "source")
    ax.set_title(fig_spec.get("title", plan.study.title), fontsize=10)
    ax.set_xlabel(fig_spec.get("xlabel", "" if x in ("source", "eval") else x))
    ax.set_ylabel(fig_spec.get("ylabel", str(fig_spec["y"])))
    if fig_spec.get("series"):
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    path = res / f"{fig_spec['file']}.png"
    fig.savefig(path, dpi=150)
    return path


# ============================================================================================== CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastairl study", description="Run, print, submit or collect one of the "
                                "paper's studies (recipes/studies/*.yaml). Without an action: each job's status.")
    p.add_argument("study", help="recipes/studies/<name>.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value for every pretraining run, after the study's own")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--run", action="store_true", help="run every job not done yet, here, one after another")
    act.add_argument("--print", action="store_true", help="print the launch commands in order")
    act.add_argument("--slurm", metavar="FILE", help="write a SLURM submit script (then: bash FILE)")
    act.add_argument("--collect", action="store_true", help="tables (CSV, Markdown) and figures of finished runs")
    p.add_argument("--tiny", action="store_true", help="the CPU-sized variant on the bundled digits "
                   "(fastairl data digits --out data/digits)")
    p.add_argument("--out", default=None, help="output folder (default studies/<name>[-tiny])")
    p.add_argument("--eval-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every evaluation (repeatable)")
    p.add_argument("--only", action="append", default=None, metavar="PATTERN",
                   help="only jobs whose id matches (glob, e.g. 'train/*', '*/byol_sgd*'); repeatable")
    p.add_argument("--launcher", default=None, help="how pretraining starts: default 'python' for --run, "
                   "'accelerate launch' for --print / --slurm (e.g. 'accelerate launch --num_processes 8')")
    p.add_argument("--rerun-stale", action="store_true", help="move run dirs of another config aside and rerun")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_intermixed_args(argv)
    from .data.datasets import DataError

    try:
        plan = make_plan(load_study(args.study), tiny=args.tiny, out=args.out, run_overrides=args.overrides,
                         eval_overrides=args.eval_set)
        if args.run:
            return run_plan(plan, args.launcher or "python", args.only, args.rerun_stale)
        launcher = args.launcher or "accelerate launch"
        if args.print:
            print_commands(plan, launcher, args.only)
        elif args.slurm:
            write_slurm(plan, Path(args.slurm), launcher)
            print(f"wrote {args.slurm}: submit with `bash {args.slurm}` ({len(plan.study.runs)} runs)")
        elif args.collect:
            return collect(plan)
        else:
            print_status(plan, args.only)
    except (StudyError, ConfigError, DataError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue (finished jobs are skipped, "
              "pretraining resumes)", file=sys.stderr)
        return 130
    return 0
