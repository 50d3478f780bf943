"""The experiment grid: validate a workflow config (``config.yaml``) and expand it into jobs.

The JSON schema (``epmq/schemas/config.schema.yaml``) checks types and fills defaults; this module adds
the checks a schema cannot make (names against the live registries, cross references between sections) and
turns the config into the concrete job lists the Snakemake rules and the CLI share. It imports no torch.

Identifiers used in file paths:

* a *suite id* is a key of ``suites:`` (its class is ``type:``, default the key itself);
* a *merge id* is a key of ``merges:`` (its method is ``method:``, default the key itself);
* a *quantizer id* is a method name (``rtn``, ``gptq``, ``epmq``, ablations) or, for a sweep point,
  ``<method>.<param>=<value>`` (e.g. ``epmq.lam_w=0.1``);
* a *quantized run* (:class:`epmq.identity.QuantRun`) is ``<merge>/<quantizer>/w<bits>g<group_size>/s<seed>``
  under ``results/<suite>/quant/``. :mod:`epmq.identity` renders and parses every one of these paths.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from epmq.errors import EPMQError
from epmq.identity import Base, Calib, Expert, Merged, Model, QuantRun, fmt_value  # noqa: F401 (fmt_value: re-exported)

#: QuantConfig fields a config may set under ``quantize.params`` or sweep (the method, bits and group size
#: come from the grid itself).
QUANT_KNOBS = ("sym", "act_order", "static_groups", "damp", "block_size", "alpha", "lam_out", "lam_w",
               "task_weighting", "fit_bias", "propagation", "forward_dtype", "act_dtype", "stats_dtype")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def relevant_knobs(method) -> tuple[str, ...]:
    """The knobs of :data:`QUANT_KNOBS` a quantizer (:class:`epmq.quant.Quantizer`) reads: its own
    :attr:`~epmq.quant.Quantizer.knobs` (everything else is ignored by it)."""
    return method.knobs


def _check_id(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _ID.match(name):
        raise EPMQError(f"{kind} id {name!r}: use letters, digits, '_', '.', '-' (it becomes a folder name)")
    return name


_PATH_SAFE = re.compile(r"^[A-Za-z0-9_.+-]+$")


def _schema() -> dict:
    import yaml

    return yaml.safe_load(schema_path().read_text())


def check_quant_knobs(where: str, knobs: dict, *, _cache={}) -> dict:
    """Each knob of ``knobs`` is a QuantConfig knob with a value of the schema's type and range (the CLI's
    ``--set``, ``quantize.params``, a suite's ``quantize:``, every sweep value). One-line error naming the knob."""
    import jsonschema

    if "props" not in _cache:
        _cache["props"] = _schema()["properties"]["quantize"]["properties"]["params"]["properties"]
    props = _cache["props"]
    for k, v in knobs.items():
        name = f"{where} {k}" if where.startswith("--") else f"{where}.{k}"
        if k not in props:
            raise EPMQError(f"{name}: unknown knob, expected one of {list(QUANT_KNOBS)}")
        err = jsonschema.exceptions.best_match(jsonschema.Draft7Validator(props[k]).iter_errors(v))
        if err is not None:
            raise EPMQError(f"{name}={v!r}: {err.message}")
    return knobs


def check_group_size(where: str, group_size) -> int:
    allowed = _schema()["properties"]["quantize"]["properties"]["group_size"]["items"]["enum"]
    if isinstance(group_size, bool) or group_size not in allowed:
        raise EPMQError(f"{where}={group_size!r}: expected one of {allowed}")
    return int(group_size)


def _literal_env(module: str, _seen=()) -> dict:
    """The names a module binds to literals, read from its source (no import: a suite module may import torch).
    Names used in a literal resolve to earlier bindings or to literals imported from other ``epmq`` modules
    (``from epmq.suites._hub import HUB_DEFAULTS``); a dict may unpack one (``{**HUB_DEFAULTS, ...}``); anything
    else reads as None (= any value)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or module in _seen:
        return {}
    env: dict = {}

    class Names(ast.NodeTransformer):
        def visit_Name(self, node):
            return ast.copy_location(ast.Constant(env.get(node.id)), node)

    def value(node):
        if isinstance(node, ast.Dict) and None in node.keys:  # {**other, "k": v}: literal_eval refuses it
            out = {}
            for k, v in zip(node.keys, node.values):
                if k is None:
                    out.update(value(v) or {})
                else:
                    out[value(k)] = value(v)
            return out
        return ast.literal_eval(node)

    for node in ast.parse(Path(spec.origin).read_text()).body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("epmq."):
            other = _literal_env(node.module, (*_seen, module))
            env.update({a.asname or a.name: other[a.name] for a in node.names if a.name in other})
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                env[node.targets[0].id] = value(Names().visit(node.value))
            except (ValueError, TypeError):
                continue
    return env


def _literal_defaults(module: str) -> dict | None:
    """A module's ``DEFAULTS`` dict read from its source (:func:`_literal_env`)."""
    return _literal_env(module).get("DEFAULTS")


def suite_defaults(kind: str) -> dict | None:
    from epmq.suites import SUITES

    return _literal_defaults(SUITES[kind].split(":")[0])


def _type_like(default) -> str | None:
    if default is None:
        return None
    if isinstance(default, bool):
        return "boolean"
    if isinstance(default, int):
        return "integer"
    if isinstance(default, float):
        return "number"
    if isinstance(default, str):
        return "string"
    if isinstance(default, (list, tuple)):
        return "list"
    if isinstance(default, dict):
        return "mapping"
    return None


#: suite options whose value may take another shape than their default's: the hub suites' ``experts`` is a
#: format string with ``{task}`` or a mapping task -> source
_OPTION_ALSO = {"experts": "mapping"}


def check_like(where: str, value, default) -> None:
    """``value`` has the type of ``default`` (an option's or hyperparameter's default; None: anything). A
    number default takes any int or float, an integer default only integers; bools are never numbers."""
    want = _type_like(default)
    ok = {
        None: lambda v: True,
        "boolean": lambda v: isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "string": lambda v: isinstance(v, str),
        "list": lambda v: isinstance(v, (list, tuple)),
        "mapping": lambda v: isinstance(v, dict),
    }[want]
    also = _OPTION_ALSO.get(where.rsplit(".", 1)[-1]) if ".options." in where else None
    if also == "mapping" and isinstance(value, dict):
        return
    if value is not None and not ok(value):
        raise EPMQError(f"{where}={value!r}: expected {'an' if want[0] in 'ai' else 'a'} {want} (default {default!r})")
    if isinstance(value, float) and not math.isfinite(value):
        raise EPMQError(f"{where}={value!r}: expected a finite number")


def check_path_component(where: str, text: str) -> str:
    """``text`` becomes part of a file path: letters, digits, ``_ . + -`` only."""
    if not _PATH_SAFE.match(text) or text in (".", ".."):
        raise EPMQError(f"{where}: {text!r} becomes part of a file path; use letters, digits, '_', '.', '+', '-'")
    return text


@dataclass
class Grid:
    """A validated config, expanded."""

    config: dict
    suites: dict[str, dict] = field(default_factory=dict)  # id -> {"type", "options", "tasks", "seed", "quantize"}
    merges: dict[str, dict] = field(default_factory=dict)  # id -> {"method", "params", "select"}
    runs: list[QuantRun] = field(default_factory=list)  # one quantize job (and its evaluation) each
    #: each run by itself: a run parsed from a path finds the grid's, whose sweep values have the config's types
    by_id: dict[QuantRun, QuantRun] = field(default_factory=dict, repr=False)
    #: suite id -> numbers quoted from the literature (checked, in table order): shown beside ours, never averaged
    anchors: dict[str, list[dict]] = field(default_factory=dict)

    # -- what the rules ask ---------------------------------------------------------------------------------
    def tasks(self, suite: str) -> list[str]:
        return list(self.suites[suite]["tasks"])

    def quoted(self, suite: str) -> list[dict]:
        """The quoted reference numbers of ``suite`` (``anchors:``; empty when it has none)."""
        return list(self.anchors.get(suite, []))

    def quant_run(self, run: QuantRun) -> QuantRun:
        """The grid's run named like ``run`` (e.g. parsed from a job's wildcards): its sweep values are the
        config's (a path's ``lam_w=1`` reads back as 1, the config may say 1.0). A run off the grid is itself
        when it is no sweep point (its id tells everything: a target asked for by path); else a one-line error."""
        if run in self.by_id:
            return self.by_id[run]
        if run.variant:
            raise EPMQError(f"quantizer {run.quantizer!r} ({run.model_id} of suite {run.suite!r}) is not in the grid")
        return run

    def merge_calib(self, suite: str, merge: str) -> str | None:
        """The calibration file a data-aware merge (``needs_calibration``) reads: the first calibration seed's
        (train split); None for the other merges."""
        from epmq.merge import get_method

        if not get_method(self.merges[merge]["method"]).needs_calibration:
            return None
        cal = self.config["calibration"]
        return Calib(suite, cal["n_per_task"], cal["seeds"][0]).weights(self.config["results"])

    def quant_config(self, run: QuantRun) -> dict:
        """The QuantConfig fields of one job (what reaches the job through ``params:``): only the knobs its
        method reads, so that changing an E-PMQ knob re-runs the E-PMQ jobs and nothing else. The run's suite's
        own ``quantize:`` knobs override ``quantize.params``; a sweep's value overrides both."""
        from epmq.quant import METHODS

        run = self.quant_run(run)
        method, variant = run.method, dict(run.variant)
        used = relevant_knobs(METHODS[method])
        own = self.suites[run.suite]["quantize"]
        params = {**self.config["quantize"]["params"], **own}
        shared = {k: v for k, v in params.items() if k in used}
        knobs = dict(sorted({**shared, **variant}.items()))
        return {"method": method, "bits": run.bits, "group_size": run.group_size, **knobs}

    def models(self, suite: str) -> list[Model]:
        """Every model evaluated for ``suite``: the base, each expert, each merge, each quantized run."""
        out: list[Model] = [Base(suite), *(Expert(suite, t) for t in self.tasks(suite))]
        out += [Merged(suite, m) for m in self.merges]
        return out + [r for r in self.runs if r.suite == suite]

    def eval_targets(self, suite: str) -> list[str]:
        """Every model id evaluated for ``suite`` (paths under ``results/<suite>/eval/``, without ``.json``)."""
        return [m.model_id for m in self.models(suite)]

    def eval_paths(self) -> list[str]:
        """Every run record of the grid (the report's inputs), in a stable order."""
        return [m.eval_record(self.config["results"]) for s in self.suites for m in self.models(s)]

    def quant_benchmarks(self) -> list[str]:
        """Every quantize job's benchmark file (the leaderboard's cost columns)."""
        return [r.benchmark() for r in self.runs]


def _registries():
    from epmq.merge.registry import METHODS as MERGES
    from epmq.quant import METHODS as QUANTS
    from epmq.suites import SUITES

    return SUITES, MERGES, QUANTS


def _suite_tasks(kind: str, options: dict) -> list[str]:
    from epmq.suites import DEFAULT_TASKS

    return list(options["tasks"]) if "tasks" in options else list(DEFAULT_TASKS[kind])


def expand(config: dict) -> Grid:
    """Validate ``config`` (already schema-checked and defaulted) against the registries; expand the grid."""
    for key in ("suites", "merges", "quantize", "calibration"):
        if key not in config:
            raise EPMQError(f"config: missing section {key!r}")
    grid = Grid(config=config)
    _expand_suites(grid, config)
    from epmq.report.anchors import normalize_anchors  # cheap: no matplotlib, no torch

    check_anchor_suites(config, grid.suites)
    grid.anchors = normalize_anchors(config.get("anchors") or {}, "anchors")
    _expand_merges(grid, config)
    _Runs(grid, config).expand()
    return grid


def _expand_suites(grid: Grid, config: dict) -> None:
    """``suites:``: each type registered, its options those of the type and of their defaults' types, its tasks
    and its own quantizer knobs."""
    SUITES, _, _ = _registries()
    for sid, s in config["suites"].items():
        _check_id("suite", sid)
        s = s or {}
        kind = s.get("type", sid)
        if kind not in SUITES:
            raise EPMQError(f"suites.{sid}.type={kind!r}: expected one of {sorted(SUITES)}")
        options = dict(sorted((s.get("options") or {}).items()))  # canonical order: params compare equal
        defaults = suite_defaults(kind)
        if defaults is not None:
            for k, v in options.items():
                if k not in defaults:
                    raise EPMQError(f"suites.{sid}.options.{k}: not an option of suite type {kind} "
                                    f"(has {sorted(defaults)})")
                check_like(f"suites.{sid}.options.{k}", v, defaults[k])
        tasks = _suite_tasks(kind, options)
        if len(tasks) < 1:
            raise EPMQError(f"suites.{sid}: no tasks")
        own = dict(sorted((s.get("quantize") or {}).items()))
        check_quant_knobs(f"suites.{sid}.quantize", own)
        grid.suites[sid] = {"type": kind, "options": options, "tasks": tasks, "seed": int(s.get("seed", 0)),
                            "quantize": own}
    if not grid.suites:
        raise EPMQError("config: suites: is empty")


def _expand_merges(grid: Grid, config: dict) -> None:
    """``merges:``: each method registered, its parameters and candidates of its defaults' types."""
    _, MERGES, _ = _registries()
    for mid, m in config["merges"].items():
        _check_id("merge", mid)
        m = m or {}
        method = m.get("method", mid)
        if method not in MERGES:
            raise EPMQError(f"merges.{mid}.method={method!r}: expected one of {sorted(MERGES)}")
        params = dict(sorted((m.get("params") or {}).items()))
        select = {k: list(v) for k, v in sorted((m.get("select") or {}).items())}
        defaults = MERGES[method].defaults
        for k in [*params, *select]:
            if k not in defaults:
                raise EPMQError(f"merges.{mid}: {k!r} is not a parameter of {method} (has {sorted(defaults)})")
        for k, v in params.items():
            check_like(f"merges.{mid}.params.{k}", v, defaults[k])
        for k, v in select.items():
            if not v:
                raise EPMQError(f"merges.{mid}.select.{k}: empty list")
            for i, c in enumerate(v):
                check_like(f"merges.{mid}.select.{k}[{i}]", c, defaults[k])
        grid.merges[mid] = {"method": method, "params": params, "select": select}
    if not grid.merges:
        raise EPMQError("config: merges: is empty")


class _Runs:
    """``quantize:`` expanded into the grid's quantized runs: the main grid, then the ablations, then each sweep
    (a run already present is not added twice: runs are equal when their ids are)."""

    def __init__(self, grid: Grid, config: dict):
        _, _, self.quants = _registries()
        self.grid, self.q = grid, config["quantize"]
        check_quant_knobs("quantize.params", self.q.get("params", {}))
        self.seeds = [int(s) for s in config["calibration"]["seeds"]]
        if not self.seeds:
            raise EPMQError("calibration.seeds: empty list")

    def methods(self, where, methods):
        for meth in methods:
            if meth not in self.quants:
                raise EPMQError(f"{where}: method {meth!r}: expected one of {sorted(self.quants)}")

    def merges(self, where, merges):
        merges = merges or list(self.grid.merges)
        for mid in merges:
            if mid not in self.grid.merges:
                raise EPMQError(f"{where}: merge {mid!r} is not a key of merges: ({sorted(self.grid.merges)})")
        return merges

    def suites(self, where, suites):
        for sid in suites or []:
            if sid not in self.grid.suites:
                raise EPMQError(f"{where}: suite {sid!r} is not a key of suites: ({sorted(self.grid.suites)})")
        return suites

    def run_seeds(self, where, subset):
        if subset is None:
            return self.seeds
        for s in subset:
            if int(s) not in self.seeds:
                raise EPMQError(f"{where}.seeds: {s} is not one of calibration.seeds {self.seeds}")
        return [int(s) for s in subset]

    def add(self, methods, bits_list, merges, variant=(), suites=None, run_seeds=None):
        run_seeds = run_seeds or self.seeds
        grid = self.grid
        for sid, mid, meth, bits, g in itertools.product(suites or grid.suites, merges, methods, bits_list,
                                                       self.q["group_size"]):
            for seed in (run_seeds if self.quants[meth].needs_calibration else run_seeds[:1]):
                run = QuantRun(sid, mid, meth, int(bits), int(g), seed, tuple(variant))
                if run not in grid.by_id:  # runs are equal when their ids (paths) are
                    grid.by_id[run] = run
                    grid.runs.append(run)

    def expand(self) -> None:
        q = self.q
        self.methods("quantize.methods", q["methods"])
        self.add(q["methods"], q["bits"], list(self.grid.merges))
        ab = q.get("ablations") or {}
        if ab.get("methods"):
            self.methods("quantize.ablations.methods", ab["methods"])
            merges = self.merges("quantize.ablations.merges", ab.get("merges"))
            self.add(ab["methods"], ab.get("bits") or q["bits"], merges,
                     suites=self.suites("quantize.ablations.suites", ab.get("suites")),
                     run_seeds=self.run_seeds("quantize.ablations", ab.get("seeds")))
        for i, sw in enumerate(q.get("sweeps") or []):
            self.sweep(f"quantize.sweeps[{i}]", sw)
        for b in {r.bits for r in self.grid.runs}:
            if not 2 <= b <= 8:
                raise EPMQError(f"bits={b}: expected 2..8")

    def sweep(self, where: str, sw: dict) -> None:
        self.methods(where, [sw["method"]])
        if sw["param"] not in QUANT_KNOBS:
            raise EPMQError(f"{where}.param={sw['param']!r}: expected one of {list(QUANT_KNOBS)}")
        merges = self.merges(where, sw.get("merges"))
        suites = self.suites(where, sw.get("suites"))
        sw_seeds = self.run_seeds(where, sw.get("seeds"))
        for j, v in enumerate(sw["values"]):
            check_quant_knobs(f"{where}.values[{j}]", {sw["param"]: v})
            check_path_component(f"{where}.values[{j}]", fmt_value(v))
            self.add([sw["method"]], sw.get("bits") or self.q["bits"], merges, ((sw["param"], v),), suites=suites,
                     run_seeds=sw_seeds)


def check_anchor_suites(config: dict, suites) -> None:
    """Every key of ``anchors:`` must be a suite id of ``suites:`` (one-line error naming the key)."""
    anchors = config.get("anchors") or {}
    if not isinstance(anchors, dict):
        raise EPMQError(f"anchors: expected a mapping suite id -> list of quoted numbers, got {anchors!r}")
    for sid in anchors:
        if sid not in suites:
            raise EPMQError(f"anchors.{sid}: suite {sid!r} is not a key of suites: ({sorted(suites)})")


def load(path: str | Path) -> Grid:
    """Read, schema-validate (with defaults) and expand a config file (the CLI's entry; Snakemake validates
    with its own ``validate`` and calls :func:`expand`)."""
    import yaml

    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise EPMQError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise EPMQError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise EPMQError(f"{path}: expected a mapping at the top level")
    validate(config)
    return expand(config)


def put_on_jobs_path(folder: str) -> None:
    """Put ``folder`` (the checkout holding the Snakefile) first on the ``PYTHONPATH`` the workflow's jobs inherit,
    so they import this checkout's epmq also where it is not installed (a conda env built from envs/epmq.yaml)."""
    import os

    parts = [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x]
    if str(folder) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(folder), *parts])


def schema_path() -> Path:
    """The config's JSON schema: package data (``epmq/schemas/``), so an installed wheel finds it too."""
    return Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"


def validate(config: dict) -> None:
    """Check ``config`` against the JSON schema and fill its defaults in place (one-line error)."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(schema_path().read_text())
    cls = jsonschema.validators.validator_for(schema)

    def set_defaults(validator, properties, instance, schema_):
        if isinstance(instance, dict):
            for k, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(k, json.loads(json.dumps(sub["default"])))
        yield from cls.VALIDATORS["properties"](validator, properties, instance, schema_)

    filling = jsonschema.validators.extend(cls, {"properties": set_defaults})
    err = jsonschema.exceptions.best_match(filling(schema).iter_errors(config))
    if err is not None:
        where = ".".join(str(p) for p in err.absolute_path) or "<top>"
        raise EPMQError(f"config {where}: {err.message}")
    check_anchor_suites(config, config["suites"])  # a cross reference the schema cannot express
