"""One run identity: the value types that name a model of the grid, and the file paths and ids they render to.

Every result is a model of a suite ``S`` (a key of ``suites:``) of one of four kinds, named by its *model id*::

    kind       model id                                             class
    base       base                                                 Base(suite)
    expert     experts/<task>                                       Expert(suite, task)
    merged     merged/<merge>                                       Merged(suite, merge)
    quantized  quant/<merge>/<quantizer>/w<bits>g<group>/s<seed>    QuantRun(suite, merge, method, bits,
                                                                             group_size, seed, variant)

A *quantizer id* is the method (``gptq``) or, for a sweep point, the method followed by ``.<knob>=<value>`` per
knob (``epmq.lam_w=0.1``), each value written by :func:`fmt_value`. The id without its ``quant/`` is the *run
id*. The calibration batches a run reads are :class:`Calib` (``calib/n<n>_s<seed>``). With ``R`` the config's
``results`` folder, a model's files are::

    R/S/<model id>.safetensors                 its weights (a quantized run's only on request)
    R/S/<model id>.json                        its record (merge / quantize record; a suite's own metadata for
                                               the base and the experts)
    R/S/eval/<model id>.json                   its run record (test accuracy per task): what the report reads
    logs/<rule>/S/<name>.log                   the log and benchmark of the job that built it, where <name> is
    benchmarks/<rule>/S/<name>.tsv             the id inside its folder (the run id, the task, ...; none: base)

The same templates render the Snakemake patterns (:meth:`Model.pattern`, wildcards ``{suite}``, ``{task}``,
``{merge}``, ``{quantizer}``, ``{bits}``, ``{group}``, ``{seed}``, ``{n}``) and parse wildcards, ids and paths
back (:func:`parse_model`, :meth:`QuantRun.from_wildcards`, :func:`parse_eval_path`, :func:`parse_benchmark`).
A string is accepted only if it renders back to itself (``w03g-1`` is refused: it would be ``w3g-1``), so
``parse(render(x)) == x`` and ``render(parse(s)) == s``; anything else is one :class:`~epmq.errors.EPMQError`
naming the string. Two quantized runs are equal when their ids are: the id is what names their files, and the
text cannot carry a sweep value's type (1 and 1.0 both read ``1``; :meth:`epmq.config.Grid.quant_run` gives
the run with the config's own values). This module imports nothing but the standard library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from epmq.errors import EPMQError
from epmq.formatting import id_value as fmt_value  # the path form (epmq.formatting says why two forms)


_INT = re.compile(r"-?\d+")
_FLOAT = re.compile(r"-?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?")
_WORD = r"[A-Za-z0-9_]+"  # a method or knob name
_VALUE = r"[A-Za-z0-9_.+-]+"  # a sweep value's text (a path component: epmq.config.check_path_component)
_QUANTIZER = re.compile(rf"(?P<method>{_WORD})(?P<knobs>(\.{_WORD}={_VALUE})*)")
#: what each wildcard of a template may hold when parsed
_WILDCARDS = {"suite": r"[^/]+", "task": r"[^/]+", "merge": r"[^/]+", "quantizer": r"[^/]+", "bits": r"\d+",
              "group": r"-?\d+", "seed": r"\d+", "n": r"\d+"}


def parse_value(text: str):
    """A sweep value read back from its :func:`fmt_value` text: bool, int, float, None or else the string."""
    if text in ("true", "false"):
        return text == "true"
    if text == "None":
        return None
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def quantizer_id(method: str, variant=()) -> str:
    """``method`` or ``method.knob=value...`` (a sweep point; knobs in ``variant``'s order)."""
    return method + "".join(f".{k}={fmt_value(v)}" for k, v in variant)


def parse_quantizer(text: str) -> tuple[str, tuple]:
    """``(method, variant)`` of a quantizer id (:func:`quantizer_id`); variant values as :func:`parse_value` reads."""
    m = _QUANTIZER.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise EPMQError(f"quantizer id {text!r}: expected <method> or <method>.<knob>=<value>[.<knob>=<value>...]")
    variant = []
    # values never hold '=', knob names never '.': split on '=', the knob is after the last '.' of each part
    parts = m["knobs"][1:].split("=") if m["knobs"] else []
    for i in range(len(parts) - 1):
        knob = parts[i].rsplit(".", 1)[-1] if i else parts[i]
        value = parts[i + 1] if i + 2 == len(parts) else parts[i + 1].rsplit(".", 1)[0]
        variant.append((knob, parse_value(value)))
    out = (m["method"], tuple(variant))
    if quantizer_id(*out) != text:
        raise EPMQError(f"quantizer id {text!r}: not canonical (it reads back as {quantizer_id(*out)!r})")
    return out


def _int(field: str, text, where: str) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if not isinstance(text, str) or not _INT.fullmatch(text) or str(int(text)) != text:
        raise EPMQError(f"{where}: {field}={text!r} is not an integer written canonically")
    return int(text)


def _ints(obj, names, where: str) -> None:
    for f in names:
        v = getattr(obj, f)
        if not isinstance(v, int) or isinstance(v, bool):
            raise EPMQError(f"{where}: {f}={v!r} is not an integer")


def _getter(w):
    """Read wildcard ``k`` of a dict or of a Snakemake ``Wildcards`` object (attributes)."""
    return w.__getitem__ if isinstance(w, dict) else lambda k: getattr(w, k)


def _segment(field: str, text, where: str) -> str:
    if not isinstance(text, str) or not text or "/" in text or text in (".", ".."):
        raise EPMQError(f"{where}: {field}={text!r} is not one path component")
    return text


@dataclass(frozen=True)
class Model:
    """A model of a suite; subclasses set ``KIND`` (the run record's ``model``), ``FOLDER`` (its results
    subfolder) and ``NAME`` (its id inside the folder, a template over its fields' wildcards)."""

    suite: str

    KIND: ClassVar[str]
    FOLDER: ClassVar[str] = ""
    NAME: ClassVar[str] = ""

    def __post_init__(self):
        _segment("suite", self.suite, f"{self.KIND} model")

    def fields(self) -> dict:
        """The template's wildcard values."""
        return {}

    @classmethod
    def template(cls) -> str:
        """The model id with wildcards (``experts/{task}``)."""
        return "/".join(p for p in (cls.FOLDER, cls.NAME) if p) or cls.KIND

    @property
    def name(self) -> str:
        """The id inside its folder (a run id, a task, a merge id; "" for the base)."""
        return self.NAME.format(**self.fields())

    @property
    def model_id(self) -> str:
        return self.template().format(**self.fields())

    # -- files --------------------------------------------------------------------------------------------------
    def weights(self, results) -> str:
        return render(results, self.suite, self.model_id, ".safetensors")

    def record(self, results) -> str:
        return render(results, self.suite, self.model_id, ".json")

    def eval_record(self, results) -> str:
        return render(results, self.suite, self.model_id, ".json", folder="eval")

    def job_file(self, kind: str, rule: str, suffix: str) -> str:
        """``<kind>/<rule>/<suite>[/<name>]<suffix>`` (``kind``: logs or benchmarks)."""
        return job_file(kind, rule, self.suite, self.name, suffix)

    # -- Snakemake patterns -------------------------------------------------------------------------------------
    @classmethod
    def pattern(cls, results, suffix: str = ".safetensors", *, folder: str = "") -> str:
        """``results/{suite}[/folder]/<template><suffix>``: a rule's output pattern."""
        return render(results, "{suite}", cls.template(), suffix, folder=folder)

    @classmethod
    def job_pattern(cls, kind: str, rule: str, suffix: str) -> str:
        return job_file(kind, rule, "{suite}", cls.NAME, suffix)

    @classmethod
    def _parse_name(cls, suite: str, name: str, where: str) -> dict:
        """The wildcard values of ``name`` (the id inside the folder) by the class's template."""
        rx = re.escape(cls.NAME)
        for w, pat in _WILDCARDS.items():
            rx = rx.replace(re.escape("{" + w + "}"), f"(?P<{w}>{pat})")
        m = re.fullmatch(rx, name)
        if m is None:
            raise EPMQError(f"{where}: expected {cls.template().replace('{', '<').replace('}', '>')}")
        return m.groupdict()


def render(results, suite: str, model_id: str, suffix: str, *, folder: str = "") -> str:
    """``results/suite[/folder]/model_id+suffix`` (plain text joined with ``/``, as the workflow writes it)."""
    return f"{results}/{suite}/{folder + '/' if folder else ''}{model_id}{suffix}"


def job_file(kind: str, rule: str, suite: str, name: str, suffix: str) -> str:
    return f"{kind}/{rule}/{suite}{'/' + name if name else ''}{suffix}"


@dataclass(frozen=True)
class Base(Model):
    KIND: ClassVar[str] = "base"


@dataclass(frozen=True)
class Expert(Model):
    task: str
    KIND: ClassVar[str] = "expert"
    FOLDER: ClassVar[str] = "experts"
    NAME: ClassVar[str] = "{task}"

    def __post_init__(self):
        super().__post_init__()
        _segment("task", self.task, f"expert of {self.suite}")

    def fields(self) -> dict:
        return {"task": self.task}


@dataclass(frozen=True)
class Merged(Model):
    merge: str
    KIND: ClassVar[str] = "merged"
    FOLDER: ClassVar[str] = "merged"
    NAME: ClassVar[str] = "{merge}"

    def __post_init__(self):
        super().__post_init__()
        _segment("merge", self.merge, f"merged model of {self.suite}")

    def fields(self) -> dict:
        return {"merge": self.merge}


@dataclass(frozen=True)
class Calib(Model):
    """The calibration batches of a suite: ``n`` examples per task, drawn with ``seed``."""

    n: int
    seed: int
    KIND: ClassVar[str] = "calib"
    FOLDER: ClassVar[str] = "calib"
    NAME: ClassVar[str] = "n{n}_s{seed}"

    def __post_init__(self):
        super().__post_init__()
        _ints(self, ("n", "seed"), f"calibration of {self.suite}")

    def fields(self) -> dict:
        return {"n": self.n, "seed": self.seed}

    @classmethod
    def from_wildcards(cls, w) -> Calib:
        """The batches a job's wildcards (``suite``, ``n``, ``seed``) name (Snakemake ``Wildcards`` or a dict)."""
        get = _getter(w)
        where = f"calibration n{get('n')}_s{get('seed')}"
        return cls(get("suite"), _int("n", get("n"), where), _int("seed", get("seed"), where))


@dataclass(frozen=True, eq=False)
class QuantRun(Model):
    """One quantized run: ``merge``'s merged model quantized by ``method`` (a sweep point: with ``variant``, a
    tuple of ``(knob, value)``) to ``bits`` bits in groups of ``group_size`` (-1: per output channel), calibrated
    on seed ``seed``'s batches (a method without calibration still has the grid's first seed in its id)."""

    merge: str
    method: str
    bits: int
    group_size: int
    seed: int
    variant: tuple = ()

    KIND: ClassVar[str] = "quantized"
    FOLDER: ClassVar[str] = "quant"
    NAME: ClassVar[str] = "{merge}/{quantizer}/w{bits}g{group}/s{seed}"

    def __post_init__(self):
        super().__post_init__()
        items = self.variant.items() if isinstance(self.variant, dict) else self.variant
        object.__setattr__(self, "variant", tuple((k, v) for k, v in items))
        where = f"quantized run of {self.suite}"
        _segment("merge", self.merge, where)
        _ints(self, ("bits", "group_size", "seed"), where)
        if not re.fullmatch(_WORD, self.method) or not all(
                re.fullmatch(_WORD, str(k)) and re.fullmatch(_VALUE, fmt_value(v)) for k, v in self.variant):
            raise EPMQError(f"{where}: quantizer {quantizer_id(self.method, self.variant)!r} cannot be a folder "
                            "name (method and knobs: letters, digits, '_'; values: also '.', '+', '-')")

    def __eq__(self, other):
        return isinstance(other, QuantRun) and (self.suite, self.model_id) == (other.suite, other.model_id)

    def __hash__(self):
        return hash((self.suite, self.model_id))

    @property
    def quantizer(self) -> str:
        """The quantizer id (``gptq``, ``epmq.lam_w=0.1``)."""
        return quantizer_id(self.method, self.variant)

    @property
    def run_id(self) -> str:
        """``<merge>/<quantizer>/w<bits>g<group>/s<seed>`` (the model id without ``quant/``)."""
        return self.name

    def fields(self) -> dict:
        return {"merge": self.merge, "quantizer": self.quantizer, "bits": self.bits, "group": self.group_size,
                "seed": self.seed}

    def merged(self) -> Merged:
        return Merged(self.suite, self.merge)

    def calib(self, n: int) -> Calib:
        return Calib(self.suite, n, self.seed)

    def benchmark(self) -> str:
        """The quantize job's benchmark file (the leaderboard's cost columns)."""
        return self.job_file("benchmarks", "quantize", ".tsv")


    @classmethod
    def from_wildcards(cls, w) -> QuantRun:
        """The run a job's wildcards (``suite``, ``merge``, ``quantizer``, ``bits``, ``group``, ``seed``) name:
        a Snakemake ``Wildcards`` object or a dict of strings."""
        get = _getter(w)
        suite, merge = get("suite"), get("merge")
        where = f"quant/{merge}/{get('quantizer')}/w{get('bits')}g{get('group')}/s{get('seed')}"
        try:
            method, variant = parse_quantizer(get("quantizer"))
        except EPMQError as err:
            raise EPMQError(f"{where}: {err}") from None
        return cls(suite, merge, method, _int("bits", get("bits"), where), _int("group", get("group"), where),
                   _int("seed", get("seed"), where), variant)


_KINDS = {c.FOLDER: c for c in (Expert, Merged, QuantRun)}
MODEL_ID_HELP = "base, experts/<task>, merged/<merge> or quant/<merge>/<quantizer>/w<bits>g<group>/s<seed>"


def parse_model(suite: str, model_id: str) -> Model:
    """The model ``model_id`` (``base``, ``experts/<task>``, ``merged/<merge>``, ``quant/<run id>``) of ``suite``."""
    where = f"model id {model_id!r}"
    folder, _, name = model_id.partition("/") if isinstance(model_id, str) else ("", "", "")
    if model_id == "base":
        return Base(_segment("suite", suite, where))
    if folder not in _KINDS or not name:
        raise EPMQError(f"{where}: expected {MODEL_ID_HELP}")
    cls = _KINDS[folder]
    w = {"suite": _segment("suite", suite, where), **cls._parse_name(suite, name, where)}
    model = cls.from_wildcards(w) if cls is QuantRun else cls(**w)
    if model.model_id != model_id:
        raise EPMQError(f"{where}: not canonical (it reads back as {model.model_id!r})")
    return model


def parse_eval_path(path) -> Model:
    """The model whose run record ``path`` is (``.../<suite>/eval/<model id>.json``), read from its end."""
    parts = Path(path).with_suffix("").parts if str(path).endswith(".json") else ()
    for depth in (5, 2, 1):  # quant/<merge>/<quantizer>/w..g../s.., experts|merged/<name>, base
        if len(parts) >= depth + 2 and parts[-depth - 1] == "eval":
            try:
                return parse_model(parts[-depth - 2], "/".join(parts[-depth:]))
            except EPMQError:
                continue
    raise EPMQError(f"{path}: not a run record path (<results>/<suite>/eval/<{MODEL_ID_HELP}>.json)")


def parse_benchmark(path) -> QuantRun:
    """The quantized run whose quantize job wrote benchmark ``path`` (``.../quantize/<suite>/<run id>.tsv``)."""
    parts = Path(path).with_suffix("").parts if str(path).endswith(".tsv") else ()
    if len(parts) >= 6 and parts[-6] == "quantize":
        model = parse_model(parts[-5], "quant/" + "/".join(parts[-4:]))
        if isinstance(model, QuantRun):
            return model
    raise EPMQError(f"{path}: not a quantize benchmark path "
                    "(benchmarks/quantize/<suite>/<merge>/<quantizer>/w<bits>g<group>/s<seed>.tsv)")
