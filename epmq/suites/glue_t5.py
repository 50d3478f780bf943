"""``t5-glue``: the paper's language setting -- FLAN-T5-base fine-tuned into eight GLUE experts (FusionBench),
merged, and the merged seq2seq model quantized; every task scored text-to-text. Needs internet once
(:meth:`T5GlueSuite.prefetch`); everything after that reads caches only.

Models
    ``base`` (hub id or local folder of a transformers ``T5ForConditionalGeneration``, default
    ``google/flan-t5-base``) and one expert per task (default ``tanganke/flan-t5-base_glue-{task}``, FusionBench's
    fully fine-tuned experts), loaded with :func:`epmq.models.sources.load_t5` (safetensors, or ``.bin`` through
    ``torch.load(weights_only=True)``; tied keys a checkpoint omits are refilled, FLAN-T5's untied ``lm_head``
    is kept as its own weight). The "encoder" object of :class:`~epmq.suites.base.Suite` is the *whole*
    ``T5ForConditionalGeneration``: merging acts on every weight, ``lm_head`` and ``shared`` included
    (:attr:`T5GlueSuite.merge_exclude` is empty: FusionBench merges the whole state dict); quantization acts on
    the encoder and decoder Linears only -- self-attention q/k/v/o, cross-attention q/k/v/o, FFN
    ``wi``/``wi_0``/``wi_1``/``wo`` (adapter ``t5``: encoder blocks, then decoder blocks) -- while embeddings,
    layer norms, relative attention biases and ``lm_head`` stay in full precision. Stored state dicts hold every
    tensor once (``encoder/decoder.embed_tokens.weight`` are ``shared.weight``:
    :func:`~epmq.models.sources.unique_state_dict`).

Heads
    None: the LM head is part of the model and the answer is generated text. :meth:`T5GlueSuite.head`
    returns None and no ``heads/`` files are written.

Evaluation (``evaluate``; prompts, label words and scoring in :mod:`epmq.tasks.glue`)
    Greedy decoding (``num_beams=1``, no sampling), at most ``max_new_tokens`` (9: FusionBench's
    ``generate(max_length=10)`` counts the decoder start token), inputs truncated to ``max_source_length``
    tokens (512, the tokenizer's limit FusionBench truncates at), batches of ``eval_batch_size`` examples in
    order of decreasing input length (deterministic; results are mapped back to the dataset order). The
    generated text is compared with the label word after ``strip().lower()``. The number each task reports in
    its record's ``accuracy`` field (the leaderboard's cell; the record's ``metric`` says which) follows
    FusionBench's GLUE protocol: **exact-match accuracy (%)** for CoLA, MNLI, MRPC, QNLI, QQP, RTE and SST-2,
    and **Spearman's rho x 100** between the generated number and the gold similarity for STS-B (a
    generation without a number counts as 0.0, as in FusionBench; constant predictions, where rho is
    undefined, report 0). Records also carry ``invalid`` (answers that are no label word), CoLA's Matthews
    correlation (x 100) and STS-B's Pearson (x 100) and ``unparsed`` count. Standard errors: binomial for
    accuracies; for Spearman the Fisher-z approximation (1 - rho^2) sqrt((1 + rho^2 / 2) / (n - 3)) (Bonett &
    Wright, 2000), x 100.

Data (HF ``nyu-mll/glue``, config = task; ``datasets={task: folder}`` reads ``save_to_disk`` copies of the same
schema: the task's text columns + ``label``, with the hub's split names)
    * ``test`` (reported): GLUE's ``validation`` split (MNLI: ``validation_matched``), as the paper and
      FusionBench report -- GLUE's test labels are hidden; ``max_test`` keeps the first N rows of a seeded
      permutation.
    * ``validation`` (merge-hyperparameter selection): ``n_val`` rows carved from GLUE ``train`` by a seeded
      permutation; ``train`` (the calibration pool): the next ``calib_pool`` rows of the same permutation,
      disjoint from validation; :meth:`T5GlueSuite.calibration_batches` draws ``n`` of them per seed.
    Each split is formatted with the task's prompt and tokenized ONCE with the base's tokenizer (inputs with
    EOS, truncated; targets = :func:`~epmq.tasks.glue.target_text` + EOS) and cached as ragged int32 tensors
    (flat ids + offsets) with gold labels and source row indices.

Calibration batches (what adapter ``t5`` runs, teacher-forced)
    ``{"input_ids", "attention_mask", "labels"}``, each batch padded to its longest example, ``labels`` padded
    with -100; batches in order of input length. The encoder's statistics skip padded input tokens, the
    decoder's skip positions without a target (labels = -100), cross-attention k/v skip padded encoder tokens.

Downloads (``prefetch``): the base (``model.safetensors`` ~1 GB: 248M parameters in float32, + tokenizer) and 8
experts (about 1 GB each) into the HF cache through ``huggingface_hub``; the 8 GLUE configs of
``nyu-mll/glue`` (a few hundred MB of parquet in all) through ``datasets``. Offline
(``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``) ``prefetch`` only checks the caches and raises ONE error
listing everything missing. ``revisions={"models": {hub id: rev}, "datasets": {"nyu-mll/glue": rev}}`` pins
them, exactly as in the ``clip`` suite (:mod:`epmq.suites.clip`, "Revisions"): every download gets its
revision, the commit read is recorded in every artefact's JSON, and a commit pin is never silently replaced.

Cache layout under ``cache_dir`` (metadata = the artefact's path ``.with_suffix(".json")``)::

    base.safetensors            base.json      # base state dict (tied copies dropped); its config.json, sources
    experts/<task>.safetensors  experts/<task>.json
    data/<task>/{test,validation,train}.safetensors  # tokenized prompts and targets, labels, source rows

Every file is written atomically; an artefact whose recorded sources differ from the options is rebuilt.

CLI::

    python -m epmq.suites.glue_t5 fetch --cache DIR [--set k=v ...]   # downloads + tokenization (internet)
    python -m epmq.suites.glue_t5 build --cache DIR [--set k=v ...]   # base/experts table on the test split
"""

from __future__ import annotations

import json
import math
import sys
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

from epmq.errors import EPMQError
from epmq.evaluate import accuracy_record
from epmq.io import save_safetensors_atomic, write_json_atomic
from epmq.models.sources import snapshot_revision
from epmq.suites._hub import DATA_KEY, HUB_DEFAULTS, HubSuite, first_line, hub_suite_cli
from epmq.suites._hub import SPLITS  # noqa: F401 -- the splits of data_file, part of this module's names
from epmq.tasks.glue import GLUE_TASKS, format_example, get_glue_task, score, target_text

#: options and their defaults (the paper's FLAN-T5-base GLUE setting).
DEFAULTS = {
    "base": "google/flan-t5-base",
    "experts": "tanganke/flan-t5-base_glue-{task}",  # format string with {task}, or {task: source}
    "tasks": GLUE_TASKS,
    "max_source_length": 512,  # input truncation (tokens, EOS included)
    "max_new_tokens": 9,  # greedy decoding budget (FusionBench: generate(max_length=10))
    "eval_batch_size": 64,
    **HUB_DEFAULTS,  # datasets, n_val, calib_pool, max_test, precision, device, threads, progress, ...
}
FORMAT_VERSION = 1
IGNORE_INDEX = -100
LABEL_COLUMN = "label"


class T5GlueSuite(HubSuite):
    """The ``t5-glue`` suite; options (constructor keywords) are listed in :data:`DEFAULTS` and the module doc."""

    name = "t5-glue"
    format_version = FORMAT_VERSION
    adapter = "t5"
    has_heads = False
    DEFAULTS = DEFAULTS
    INT_OPTIONS = (("max_source_length", 2), ("max_new_tokens", 1), ("n_val", 1), ("calib_pool", 1),
                   ("eval_batch_size", 1))
    task_lookup = staticmethod(get_glue_task)
    #: keys the merge leaves at the base's value: none (``lm_head`` is merged, as FusionBench merges the whole
    #: state dict; the default exclusion list of :mod:`epmq.merge.driver` would keep the base's ``lm_head``)
    merge_exclude: tuple[str, ...] = ()

    def __init__(self, cache_dir, *, seed: int = 0, **options):
        super().__init__(cache_dir, seed=seed, **options)
        self._tok = None

    # -- paths: the Suite layout (head_path is never written: no heads, the LM head is part of the model) ----

    def model_sources(self) -> list[str]:
        """Every model source this suite reads (base, then the experts), in order."""
        return [str(self.cfg["base"])] + [self.expert_source(t) for t in self.tasks]

    def _base_folder(self) -> Path:
        """The base's folder, at the commit ``base.json`` recorded when there is one (tokenizer and config then
        match the imported weights), else at the pinned revision."""
        meta = self._read_json(self.base_path.with_suffix(".json"))
        rev = meta.get("revision") if meta and meta.get("key") == self._base_key() else None
        return self._resolve_model(self.cfg["base"], revision=rev)

    # -- helpers --------------------------------------------------------------------------------------------

    def tokenizer(self):
        """The base's tokenizer (its ``tokenizer.json`` etc., read from the resolved base folder; no code runs)."""
        if self._tok is None:
            from transformers import AutoTokenizer

            folder = self._base_folder()
            try:
                self._tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            except Exception as e:  # noqa: BLE001 -- missing/corrupt tokenizer files: one message
                raise EPMQError(f"base {self.cfg['base']!r}: cannot load its tokenizer from {folder} "
                                f"({type(e).__name__}: {first_line(e)})") from e
        return self._tok

    # -- base -----------------------------------------------------------------------------------------------
    def _base_key(self) -> dict:
        return {"base": str(self.cfg["base"]), "format": FORMAT_VERSION}

    def base_meta(self) -> dict:
        """``base.json`` (building the base if it is missing or was built from another source)."""
        self.build_base()
        return json.loads(self.base_path.with_suffix(".json").read_text())

    def build_base(self) -> Path:
        """Import the base (cached; re-imported when ``base`` changed); return its path. No heads to build."""
        meta = self._read_json(self.base_path.with_suffix(".json"))
        base = str(self.cfg["base"])
        if self.base_path.is_file() and meta and meta.get("key") == self._base_key():
            self._check_pin(f"base {base!r}", self.model_revision(base), meta.get("revision"), self.base_path)
            return self.base_path
        from epmq.models.sources import load_t5, t5_head_tied, unique_state_dict

        t0 = time.perf_counter()
        folder = self._resolve_model(base)
        raw = json.loads((folder / "config.json").read_text())
        model = load_t5(folder)
        sd = {k: (v.float() if v.is_floating_point() else v) for k, v in unique_state_dict(model).items()}
        meta = {"what": "base", "key": self._base_key(), "source": str(self.cfg["base"]), "folder": str(folder),
                "revision": snapshot_revision(folder), "revision_pinned": self.model_revision(base), "config": raw,
                "head_tied": t5_head_tied(raw),
                "n_params": int(sum(v.numel() for v in sd.values())), "seconds": time.perf_counter() - t0,
                "suite_config": self.config()}
        save_safetensors_atomic(self.base_path, sd, {"source": str(self.cfg["base"])})
        write_json_atomic(self.base_path.with_suffix(".json"), meta)
        self._base_sd = None
        return self.base_path

    def base_state_dict(self) -> dict:
        if self._base_sd is None:
            from epmq.models.sources import load_state_dict

            self._base_sd = load_state_dict(self.build_base())
        return self._base_sd

    # -- models ---------------------------------------------------------------------------------------------
    def new_encoder(self):
        """A ``T5ForConditionalGeneration`` of the base's architecture (random weights, FLAN's untied head)."""
        from epmq.models.sources import build_t5

        return build_t5(self.base_meta()["config"])

    def load_encoder(self, weights):
        """A new model (eval mode) holding ``weights``: a safetensors path or a state dict (strict; tied copies
        such as ``encoder.embed_tokens.weight`` may be absent)."""
        from epmq.models.sources import build_t5, load_t5_weights

        if not isinstance(weights, (str, Path, Mapping)):
            raise EPMQError(f"load_encoder: expected a path or a state dict, got {type(weights).__name__}")
        meta = self.base_meta()
        who = str(weights) if isinstance(weights, (str, Path)) else "state dict"
        return load_t5_weights(build_t5(meta["config"]), weights, who, head_tied=bool(meta["head_tied"]))

    def head(self, task: str):
        """None: answers are generated by the model's own LM head (nothing per task to build or freeze)."""
        self._check_task(task)
        return None

    # -- experts --------------------------------------------------------------------------------------------
    def _expert_key(self, task: str) -> dict:
        return {"source": self.expert_source(task), "base": self._base_key(), "format": FORMAT_VERSION}

    def build_base_weights(self) -> Path:
        return self.build_base()  # the base is its weights alone (no heads)

    def _import_expert(self, folder: Path, task: str, src: str) -> dict:
        from epmq.models.sources import load_t5, unique_state_dict

        if folder.is_dir() and (folder / "config.json").is_file():
            model = load_t5(folder)  # its own config: another architecture shows up as shape mismatches
        else:  # a bare weights file: the base's architecture
            model = load_t5(self._base_folder(), weights=folder)
        return unique_state_dict(model)

    def _expert_meta(self, task: str) -> dict:
        return {}

    # -- data -----------------------------------------------------------------------------------------------
    def hf_split(self, task: str, which: str) -> str:
        """The GLUE split read for ``which``: the task's ``eval_split`` for ``"test"``, else ``train``."""
        return get_glue_task(task).eval_split if which == "test" else "train"

    def dataset_columns(self, task: str) -> tuple[str, ...]:
        """The columns ``task``'s dataset must have: its text fields and ``label``."""
        return (*get_glue_task(task).fields, LABEL_COLUMN)

    def _data_key(self, task: str, split: str) -> dict:
        return {"source": self.dataset_source(task), "hf_split": self.hf_split(task, split),
                "base": str(self.cfg["base"]), "max_source_length": self.cfg["max_source_length"],
                "seed": self.seed, "format": FORMAT_VERSION, **self.split_key(split)}

    def _build_data(self, task: str, split: str, path: Path, key: dict) -> None:
        """Tokenize ``task``/``split`` (``test`` = GLUE validation) once (see
        :meth:`~epmq.suites._hub.HubSuite.data_file`)."""
        import numpy as np
        import torch

        t0 = time.perf_counter()
        t = get_glue_task(task)
        ds = self._dataset(task, "test" if split == "test" else "train")
        idx = self.split_indices(task, split, len(ds))
        rows = ds.select(idx.tolist()).to_dict()
        n = len(idx)
        examples = [{f: rows[f][i] for f in t.fields} for i in range(n)]
        gold = rows[LABEL_COLUMN]
        prompts = [format_example(t, ex) for ex in examples]
        targets = [target_text(t, g) for g in gold]  # refuses test-split rows (label -1) with a clear error
        tok = self.tokenizer()
        enc = tok(prompts, truncation=True, max_length=self.cfg["max_source_length"])["input_ids"]
        tgt = tok(targets, truncation=True, max_length=self.cfg["max_source_length"])["input_ids"]

        def ragged(seqs):
            lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
            flat = np.fromiter((x for s in seqs for x in s), dtype=np.int32, count=int(lens.sum()))
            return torch.from_numpy(flat), torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]))

        ids, offsets = ragged(enc)
        tids, toffsets = ragged(tgt)
        labels = torch.tensor(gold, dtype=torch.float32 if t.is_regression else torch.int64)
        tensors = {"input_ids": ids, "input_offsets": offsets, "target_ids": tids, "target_offsets": toffsets,
                   "labels": labels, "indices": torch.from_numpy(idx)}
        save_safetensors_atomic(path, tensors, {DATA_KEY: json.dumps(key, sort_keys=True)})
        write_json_atomic(path.with_suffix(".json"), {
            "what": "tokenized prompts and targets", "task": task, "split": split, "key": key, "n": n,
            "n_source_rows": len(ds), **self._dataset_provenance(task, ds),
            "dataset_fingerprint": getattr(ds, "_fingerprint", None),
            "truncated": int(sum(len(s) >= self.cfg["max_source_length"] for s in enc)),
            "max_input_tokens": int(max((len(s) for s in enc), default=0)), "seconds": time.perf_counter() - t0})

    def _load_split(self, task: str, split: str) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.data_file(task, split)))

    @staticmethod
    def _rows(flat, offsets, idx) -> list:
        return [flat[int(offsets[i]):int(offsets[i + 1])] for i in idx]

    def _pad(self, seqs, pad_value: int):
        """(B, T) int64 of ``seqs`` padded at the end with ``pad_value``, and the (B, T) int64 mask."""
        import torch

        width = max(len(s) for s in seqs)
        out = torch.full((len(seqs), width), int(pad_value), dtype=torch.int64)
        mask = torch.zeros((len(seqs), width), dtype=torch.int64)
        for i, s in enumerate(seqs):
            out[i, :len(s)] = s.long()
            mask[i, :len(s)] = 1
        return out, mask

    def _pad_id(self) -> int:
        tok = self.tokenizer()
        if tok.pad_token_id is not None:
            return int(tok.pad_token_id)
        return int(self.base_meta()["config"].get("pad_token_id", 0))

    def labels(self, task: str, split: str):
        return self._load_split(task, split)["labels"]

    def indices(self, task: str, split: str):
        """Source-row indices of the cached ``split`` (for provenance and disjointness checks)."""
        return self._load_split(task, split)["indices"]

    def calibration_batches(self, task: str, n: int, *, seed: int, batch_size: int = 32) -> list:
        """``n`` examples of the calibration pool (train minus validation) drawn with ``seed``, as teacher-forcing
        batches ``{"input_ids", "attention_mask", "labels"}`` (labels padded with -100), by input length."""
        import numpy as np
        import torch

        self._check_task(task)
        d = self._load_split(task, "train")
        size = len(d["labels"])
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= size:
            raise EPMQError(f"calibration_batches({task}): n={n!r}: expected 1..{size} (raise calib_pool)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise EPMQError(f"calibration_batches({task}): batch_size={batch_size!r}: expected an integer >= 1")
        rng = np.random.default_rng([int(seed), zlib.crc32(task.encode()), 2])
        idx = np.sort(rng.choice(size, size=n, replace=False))
        lens = (d["input_offsets"][1:] - d["input_offsets"][:-1])[torch.from_numpy(idx)]
        idx = idx[torch.sort(lens, stable=True).indices.numpy()]  # little padding; padding is masked anyway
        pad = self._pad_id()
        out = []
        for s in range(0, n, batch_size):
            part = idx[s:s + batch_size]
            ids, mask = self._pad(self._rows(d["input_ids"], d["input_offsets"], part), pad)
            labels, _ = self._pad(self._rows(d["target_ids"], d["target_offsets"], part), IGNORE_INDEX)
            out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        return out

    # -- evaluation -----------------------------------------------------------------------------------------
    def generate(self, model, task: str, split: str = "test") -> list[str]:
        """The greedy answers of ``model`` to every prompt of ``task``/``split``, in the split's order."""
        import torch
        from transformers import GenerationConfig

        from epmq.precision import autocast

        d = self._load_split(task, split)
        offsets = d["input_offsets"]
        n = len(offsets) - 1
        order = torch.sort(offsets[1:] - offsets[:-1], descending=True, stable=True).indices.tolist()
        dev = self.device()
        cfg = model.config
        gen = GenerationConfig(max_new_tokens=self.cfg["max_new_tokens"], do_sample=False, num_beams=1,
                               decoder_start_token_id=cfg.decoder_start_token_id, eos_token_id=cfg.eos_token_id,
                               pad_token_id=cfg.pad_token_id)
        tok, pad = self.tokenizer(), self._pad_id()
        bs = self.cfg["eval_batch_size"]
        out: list[str | None] = [None] * n
        for s in self._bar(range(0, n, bs), f"eval {task}/{split}", total=math.ceil(n / bs)):
            part = order[s:s + bs]
            ids, mask = self._pad(self._rows(d["input_ids"], offsets, part), pad)
            with torch.no_grad(), autocast(dev, self.cfg["precision"]):
                seqs = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=gen)
            for i, text in zip(part, tok.batch_decode(seqs.cpu(), skip_special_tokens=True)):
                out[i] = text
        return out

    def evaluate(self, encoder, task: str, *, split: str = "test") -> dict:
        """Generate ``task``'s answers on ``split`` and score them (see the module doc for what ``accuracy``
        holds); the model is moved to the suite's device."""
        self._check_task(task)
        was_training = encoder.training
        encoder.to(self.device()).eval()
        preds = self.generate(encoder, task, split)
        encoder.train(was_training)
        gold = self.labels(task, split).tolist()
        return glue_record(task, split, score(task, preds, gold))


def glue_record(task: str, split: str, scores: dict) -> dict:
    """An evaluation record from :func:`epmq.tasks.glue.score`'s fractions: ``accuracy`` holds the task's
    headline metric in % (exact-match accuracy; STS-B: Spearman's rho x 100, 0 when undefined), ``metric``
    names it; the other metrics ride along (x 100)."""
    n = int(scores["n"])
    if "spearman" in scores:
        rho = scores["spearman"]
        undefined = not math.isfinite(rho)
        rho = 0.0 if undefined else rho
        se = (1 - rho**2) * math.sqrt((1 + rho**2 / 2) / (n - 3)) if n > 3 else None
        pearson = scores["pearson"]
        return {"task": task, "split": split, "n": n, "metric": "spearman", "accuracy": 100.0 * rho,
                "stderr": None if se is None else 100.0 * se, "spearman": 100.0 * rho,
                "pearson": 100.0 * pearson if math.isfinite(pearson) else None, "unparsed": int(scores["unparsed"]),
                "constant_predictions": undefined}
    extra = {"metric": "accuracy", "invalid": int(scores["invalid"])}
    if "matthews_corr" in scores:
        extra["matthews_corr"] = 100.0 * scores["matthews_corr"]
    return accuracy_record(task, split, round(scores["accuracy"] * n), n, **extra)


# --------------------------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    return hub_suite_cli(T5GlueSuite, argv, doc=__doc__, base_label="base", width=8, preprocess_flag=False)


if __name__ == "__main__":
    sys.exit(main())
