"""Registry of the CLIP image-classification tasks of the task-arithmetic / FusionBench literature.

``TASKS_8`` is the task-arithmetic benchmark (Ilharco et al.), ``TASKS_14`` and ``TASKS_20`` add the six and
twelve tasks of the TALL-masks benchmark, all in FusionBench's order and under FusionBench's task names (the
names its experts ``tanganke/clip-vit-<arch>_<task>`` carry).

Each :class:`ClipTask` says where the real data lives on the Hugging Face hub (dataset id, optional config,
split names, image and label columns) and how to build its zero-shot head: the class names, in the dataset's
label order, and the task's prompt templates (``str.format`` strings with one ``{}`` for the class name; the
standard CLIP / task-arithmetic sets). Class names and templates are exactly those of the heads the FusionBench
experts were fine-tuned and evaluated with (``fusion_bench/tasks/clip_classification/*.py`` of the
``fusion-bench`` package), quirks included -- CIFAR-100 class 26 is ``cra``, not ``crab`` -- because an
expert's accuracy depends on the exact head it was trained with; ``tests/test_tasks.py`` compares every task
with the installed ``fusion-bench``'s lists.

Dataset ids and splits are those of FusionBench's dataset configs (``fusion_bench_config/dataset/
image_classification/{train,test}/<task>.yaml``), under the hub's current names where a repository moved
(FusionBench's ``mnist`` and ``svhn`` are ``ylecun/mnist`` and ``ufldl-stanford/svhn``). FusionBench reads every
one of them through the same loader, which takes an ``image`` and a ``label`` column (its dataset README:
"each dataset should have 'image' and 'label' columns"); the exception is FER2013, whose loader renames the
webdataset's ``jpg`` / ``cls``, read here directly. These columns were checked against FusionBench's code, not
against the hub: a wrong one fails loudly at load time rather than silently. The class-name lists live in
``clip_classnames.json`` beside this module and are read on first use, so importing this module is cheap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache

from epmq.errors import EPMQError

TASKS_8 = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
TASKS_14 = TASKS_8 + ("oxford_flowers102", "pcam", "fer2013", "oxford-iiit-pet", "stl10", "cifar100")
TASKS_20 = TASKS_14 + ("cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered-sst2")

_CLASSNAMES_FILE = "clip_classnames.json"


@dataclass(frozen=True)
class ClipTask:
    """One CLIP classification task: its hub data set and its zero-shot prompts.

    ``classnames[i]`` names label ``i`` of ``label_column``; every template holds one ``{}``.
    """

    name: str
    hf_dataset: str
    train_split: str
    test_split: str
    image_column: str
    label_column: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    hf_config: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "classnames", tuple(self.classnames))
        object.__setattr__(self, "templates", tuple(self.templates))
        if len(self.classnames) < 2:
            raise EPMQError(f"ClipTask {self.name!r}: needs at least 2 class names, got {len(self.classnames)}")
        if len(set(self.classnames)) != len(self.classnames):
            dup = sorted({c for c in self.classnames if self.classnames.count(c) > 1})
            raise EPMQError(f"ClipTask {self.name!r}: duplicate class names {dup[:5]}")
        if not self.templates:
            raise EPMQError(f"ClipTask {self.name!r}: no prompt templates")
        for t in self.templates:
            if not isinstance(t, str) or t.count("{}") != 1:
                raise EPMQError(f"ClipTask {self.name!r}: template {t!r} must hold exactly one '{{}}'")

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, classname: str) -> tuple[str, ...]:
        """Every template filled with ``classname``."""
        return tuple(t.format(classname) for t in self.templates)


# --- prompt templates (CLIP paper / task-arithmetic sets) ---------------------------------------------------
_PHOTO_2 = ("a photo of a {}.", "a photo of the {}.")
_NUMBER = ('a photo of the number: "{}".',)
_CIFAR = tuple(
    f"a {adj}photo of {art} {size}{{}}." if adj or size else f"a photo of {art} {{}}."
    for art in ("a", "the")
    for adj, size in (("", ""), ("blurry ", ""), ("black and white ", ""), ("low contrast ", ""),
                      ("high contrast ", ""), ("bad ", ""), ("good ", ""), ("", "small "), ("", "big "))
)
_CARS = ("a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!", "a photo of my dirty {}.",
         "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}.")
_DTD = tuple(f"a photo of {art} {{}} {kind}." for art in ("a", "the")
             for kind in ("texture", "pattern", "thing", "object"))
_EUROSAT = ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
            "a centered satellite photo of the {}.")
_GTSRB = ('a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
          'a close up photo of a "{}" traffic sign.')
_RESISC45 = tuple(f"{src} {kind} of {art}{{}}." for art in ("", "a ", "the ")
                  for kind in ("imagery", "photo", "view") for src in ("satellite", "aerial"))
_FER2013 = ("a photo of a {} looking face.", "a photo of a face showing the emotion: {}.",
            "a photo of a face looking {}.", "a face that looks {}.", "they look {}.", "look at how {} they are.")

# name -> (hf_dataset, hf_config, train_split, test_split, image_column, label_column, templates)
_SPECS: dict[str, tuple] = {
    "sun397": ("tanganke/sun397", None, "train", "test", "image", "label", _PHOTO_2),
    "stanford-cars": ("tanganke/stanford_cars", None, "train", "test", "image", "label", _CARS),
    "resisc45": ("tanganke/resisc45", None, "train", "test", "image", "label", _RESISC45),
    "eurosat": ("tanganke/eurosat", None, "train", "test", "image", "label", _EUROSAT),
    "svhn": ("ufldl-stanford/svhn", "cropped_digits", "train", "test", "image", "label", _NUMBER),
    "gtsrb": ("tanganke/gtsrb", None, "train", "test", "image", "label", _GTSRB),
    "mnist": ("ylecun/mnist", None, "train", "test", "image", "label", _NUMBER),
    "dtd": ("tanganke/dtd", None, "train", "test", "image", "label", _DTD),
    "oxford_flowers102": ("dpdl-benchmark/oxford_flowers102", None, "train", "test", "image", "label",
                          ("a photo of a {}, a type of flower.",)),
    "pcam": ("1aurent/PatchCamelyon", None, "train", "test", "image", "label", ("this is a photo of {}",)),
    # webdataset export from clip-benchmark: image in 'jpg', label in 'cls' (as FusionBench's loader reads it)
    "fer2013": ("clip-benchmark/wds_fer2013", None, "train", "test", "jpg", "cls", _FER2013),
    "oxford-iiit-pet": ("timm/oxford-iiit-pet", None, "train", "test", "image", "label",
                        ("a photo of a {}, a type of pet.",)),
    "stl10": ("tanganke/stl10", None, "train", "test", "image", "label", _PHOTO_2),
    # FusionBench's copies (its experts were trained and scored on them), not uoft-cs/*: image + label columns
    "cifar100": ("tanganke/cifar100", None, "train", "test", "image", "label", _CIFAR),
    "cifar10": ("tanganke/cifar10", None, "train", "test", "image", "label", _CIFAR),
    "food101": ("ethz/food101", None, "train", "validation", "image", "label", ("a photo of {}, a type of food.",)),
    "fashion_mnist": ("zalando-datasets/fashion_mnist", None, "train", "test", "image", "label", _PHOTO_2),
    "emnist_letters": ("tanganke/emnist_letters", None, "train", "test", "image", "label",
                       ('a photo of the digit character: "{}".',)),
    "kmnist": ("tanganke/kmnist", None, "train", "test", "image", "label", ("a photo of the character {}.",)),
    "rendered-sst2": ("nateraw/rendered-sst2", None, "train", "test", "image", "label",
                      ("a {} review of a movie.",)),
}
assert tuple(_SPECS) == TASKS_20


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


_BY_KEY = {_key(n): n for n in TASKS_20}


@cache
def _classnames() -> dict[str, tuple[str, ...]]:
    from importlib.resources import files

    res = files("epmq.tasks").joinpath(_CLASSNAMES_FILE)
    try:
        raw = json.loads(res.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # missing from an install without package data, or corrupt
        raise EPMQError(f"epmq/tasks/{_CLASSNAMES_FILE}: cannot read the CLIP class-name lists ({e}); "
                        "is it installed as package data?") from e
    missing = [n for n in TASKS_20 if n not in raw]
    if missing:
        raise EPMQError(f"{_CLASSNAMES_FILE}: no class names for tasks {missing}")
    return {n: tuple(raw[n]) for n in TASKS_20}


@cache
def _build(name: str) -> ClipTask:
    ds, config, train, test, image_col, label_col, templates = _SPECS[name]
    return ClipTask(name=name, hf_dataset=ds, train_split=train, test_split=test, image_column=image_col,
                    label_column=label_col, classnames=_classnames()[name], templates=templates, hf_config=config)


def get_task(name: str) -> ClipTask:
    """The :class:`ClipTask` called ``name`` (case, and ``-`` versus ``_``, do not matter)."""
    canonical = _BY_KEY.get(_key(name)) if isinstance(name, str) else None
    if canonical is None:
        raise EPMQError(f"unknown CLIP task {name!r}: expected one of {list(TASKS_20)}")
    return _build(canonical)


def task_list(n: int) -> tuple[str, ...]:
    """The 8-, 14- or 20-task benchmark's task names, in order."""
    lists = {8: TASKS_8, 14: TASKS_14, 20: TASKS_20}
    if isinstance(n, bool) or n not in lists:
        raise EPMQError(f"task_list(n={n!r}): expected one of {sorted(lists)}")
    return lists[n]
