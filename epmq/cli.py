"""``epmq``: single workflow steps outside Snakemake, and ``epmq run`` for the whole grid.

Every step reads the same config as the workflow (default ``config.yaml``) and writes the same artefacts
to the same paths (rendered by :mod:`epmq.identity`, as the rules' are), through the same functions the
Snakemake scripts call::

    epmq build     --suite tiny-vit                      # base + heads + every expert
    epmq merge     --suite tiny-vit --merge task_arithmetic
    epmq calibrate --suite tiny-vit --seed 0
    epmq quantize  --suite tiny-vit --merge task_arithmetic --method epmq --bits 3 --seed 0 --set lam_w=0.1
    epmq evaluate  --suite tiny-vit --model quant/task_arithmetic/epmq.lam_w=0.1/w3g-1/s0
    epmq export    --suite clip --merge ties --method epmq --bits 4 --format gptq --out ship/  # a folder to ship
    epmq report                                          # leaderboard from the grid's eval records
    epmq run       [-- snakemake options]                # the whole DAG: snakemake --cores all ...
    epmq grid                                            # what the config expands to
    epmq pin       [--write | --check]                   # hub revisions: branches -> commits (internet)
    epmq digest    results/ [--against before.txt]       # hashes of records + weights, timings left out
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from epmq.errors import EPMQError

ROOT = Path(__file__).resolve().parent.parent


def _value(text: str):
    import yaml

    return yaml.safe_load(text)


def _sets(pairs) -> dict:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise EPMQError(f"--set {p!r}: expected key=value")
        k, v = p.split("=", 1)
        out[k] = _value(v)
    return out


def _checked_sets(args) -> dict:
    """``--method``, ``--set`` knobs, ``--bits`` and ``--group-size`` checked as the config's are (one line naming
    the bad one)."""
    from epmq.config import check_group_size, check_quant_knobs
    from epmq.quant import METHODS

    if args.method not in METHODS:
        raise EPMQError(f"--method={args.method}: expected one of {list(METHODS)}")
    if not 2 <= args.bits <= 8:
        raise EPMQError(f"--bits={args.bits}: expected 2..8")
    check_group_size("--group-size", args.group_size)
    return check_quant_knobs("--set", _sets(args.set))


def _grid(args):
    from epmq.config import load

    return load(args.config)


def _spec(grid, args):
    from epmq.pipeline import suite_spec, with_threads

    if args.suite not in grid.suites:
        raise EPMQError(f"--suite {args.suite!r}: not in the config (has {sorted(grid.suites)})")
    return with_threads(suite_spec(grid, args.suite), args.threads or grid.config["threads"])


def _quant_run(grid, args):
    """The quantized run the flags of ``quantize`` / ``export`` name (``--set`` knobs as its sweep point, in name
    order) and its QuantConfig fields: the config's knobs, the suite's, then ``--set``."""
    from epmq.identity import QuantRun

    overrides = _checked_sets(args)
    if args.suite not in grid.suites:
        raise EPMQError(f"--suite {args.suite}: not a key of suites: ({sorted(grid.suites)})")
    run = QuantRun(args.suite, args.merge, args.method, args.bits, args.group_size, args.seed,
                   tuple(sorted(overrides.items())))
    qcfg = {"method": args.method, "bits": args.bits, "group_size": args.group_size,
            **grid.config["quantize"]["params"], **grid.suites[args.suite]["quantize"], **overrides}
    return run, qcfg


def cmd_build(args):
    from epmq import pipeline

    grid = _grid(args)
    spec = _spec(grid, args)
    print(pipeline.build_base(spec))
    for t in [args.task] if args.task else grid.tasks(args.suite):
        print(pipeline.build_expert(spec, t))


def cmd_merge(args):
    from epmq import pipeline
    from epmq.identity import Merged

    grid = _grid(args)
    if args.merge not in grid.merges:
        raise EPMQError(f"--merge {args.merge!r}: not in the config (has {sorted(grid.merges)})")
    m = grid.merges[args.merge]
    out = args.out or Merged(args.suite, args.merge).weights(grid.config["results"])
    rec = pipeline.merge(_spec(grid, args), args.merge, m["method"], m["params"], m["select"], out,
                         calib=grid.merge_calib(args.suite, args.merge))
    print(f"{out}: {m['method']} {rec['params']}")


def cmd_calibrate(args):
    from epmq import pipeline
    from epmq.identity import Calib

    grid = _grid(args)
    cal = grid.config["calibration"]
    n = args.n or cal["n_per_task"]
    out = args.out or Calib(args.suite, n, args.seed).weights(grid.config["results"])
    print(pipeline.calibrate(_spec(grid, args), n, args.seed, cal["batch_size"], out))


def cmd_quantize(args):
    from epmq import pipeline

    grid = _grid(args)
    run, qcfg = _quant_run(grid, args)
    n, results = grid.config["calibration"]["n_per_task"], grid.config["results"]
    out = args.out or run.weights(results)
    files = pipeline.QuantizeFiles(merged=run.merged().weights(results), calib=run.calib(n).weights(results),
                                   out=out, packed=args.packed)
    rec = pipeline.quantize(_spec(grid, args), run, qcfg, files,
                            pipeline.QuantizeOptions(n_calib=n, device=args.device or grid.config["device"]))
    print(f"{out}: {rec['method']} {rec['bits']}-bit, {rec['cost']['quantize_seconds']:.1f} s")
    if args.packed:
        pk = rec["packed"]
        print(f"{args.packed}: packed checkpoint, {pk['total_bytes']} bytes; quantized weights at "
              f"{pk['packed_ratio']:.3f} of their fp16 size")


def cmd_export(args):
    from epmq.export import export_cell

    grid = _grid(args)
    spec = _spec(grid, args)
    run, qcfg = _quant_run(grid, args)
    cal, results = grid.config["calibration"], grid.config["results"]
    n = cal["n_per_task"]
    rec = export_cell(spec, run, qcfg, results_dir=results, calib=run.calib(n).weights(results),
                      merged=run.merged().weights(results), out=args.out, fmt=args.format, n_calib=n,
                      batch_size=cal["batch_size"], device=args.device or grid.config["device"],
                      packed_from=args.from_packed, gptq_format=args.gptq_format, scale_dtype=args.scale_dtype)
    print(f"{args.out}: {args.format}, {rec['bits']}-bit, {rec['n_quantized']} quantized weights, "
          f"{rec['weights_bytes'] / 2**20:.2f} MB weights, {len(rec['files'])} files")


def cmd_evaluate(args):
    from epmq import pipeline
    from epmq.identity import parse_model

    grid = _grid(args)
    spec = _spec(grid, args)
    model = parse_model(args.suite, args.model)
    weights = args.weights or model.weights(grid.config["results"])
    out = args.out or model.eval_record(grid.config["results"])
    rec = pipeline.evaluate(spec, model, weights, out)
    for t, r in rec["tasks"].items():
        print(f"{t:>20}: {r['accuracy']:6.2f} ± {r['stderr']:.2f}  (n={r['n']})")
    print(f"wrote {out}")


def cmd_report(args):
    from epmq import pipeline

    grid = _grid(args)
    records = [(m, m.eval_record(grid.config["results"])) for s in grid.suites for m in grid.models(s)]
    missing = [e for _, e in records if not Path(e).is_file()]
    if missing and not args.partial:
        raise EPMQError(f"{len(missing)} eval records missing, e.g. {missing[0]} (run the grid, or --partial)")
    records = [(m, e) for m, e in records if Path(e).is_file()]
    evals = [e for _, e in records]
    benches = [b for b in grid.quant_benchmarks() if Path(b).is_file()]
    # quoted numbers of the suites that have records (with --partial a suite may have none yet)
    present = {m.suite for m, _ in records}
    anchors = {s: grid.quoted(s) for s in grid.anchors if s in present}
    paths = pipeline.report(evals, args.out or grid.config["reports"], benchmarks=benches,
                            meta=pipeline.run_meta(grid), anchors=anchors)
    for p in paths.values():
        print(p)


def cmd_grid(args):
    grid = _grid(args)
    for s in grid.suites:
        runs = [r for r in grid.runs if r.suite == s]
        print(f"{s}: tasks {grid.tasks(s)}; merges {list(grid.merges)}; {len(runs)} quantized runs")
        if args.verbose:
            for r in runs:
                print(f"  {r.model_id}")


def _hub_pins(grid) -> dict:
    """``{suite id: {"models": {hub id: revision}, "datasets": {hub id: revision}}}`` for every suite that reads
    from the hub (revision None where the config pins none)."""
    from epmq.suites import get_suite

    out = {}
    for sid, s in grid.suites.items():
        suite = get_suite(s["type"], Path(grid.config["results"]) / sid, seed=s["seed"], **s["options"])
        if not hasattr(suite, "hub_models"):
            continue  # a suite whose data and models come from the registries: nothing to pin
        out[sid] = {"models": {m: suite.model_revision(m) for m in suite.hub_models()},
                    "datasets": {d: suite.dataset_revision(d) for d in suite.hub_datasets()}}
    return out


def _rewrite_revisions(text: str, sid: str, resolved: dict) -> str:
    """``text`` (a config file) with the value of each ``suites.<sid>.options.revisions.<kind>.<id>`` line in
    ``resolved`` replaced, comments and layout kept (block-style YAML, as the paper configs write it)."""
    import re

    key_line = re.compile(r"^(?P<indent>\s*)(?P<key>[\"']?[A-Za-z0-9][^:\"'#]*[\"']?):(?P<sep>\s*)(?P<value>[^#]*?)"
                          r"(?P<rest>\s*(#.*)?)$")
    stack: list[tuple[int, str]] = []
    out = []
    for line in text.split("\n"):
        m = key_line.match(line)
        if m and not line.lstrip().startswith("#"):
            indent, key = len(m["indent"]), m["key"].strip("\"'")
            while stack and stack[-1][0] >= indent:
                stack.pop()
            path = [k for _, k in stack] + [key]
            stack.append((indent, key))
            if len(path) == 6 and path[:4] == ["suites", sid, "options", "revisions"] and m["value"]:
                new = resolved.get(path[4], {}).get(path[5])
                if new is not None:
                    line = f"{m['indent']}{m['key']}:{m['sep']}{new}{m['rest']}"
        out.append(line)
    return "\n".join(out)


def cmd_pin(args):
    """Resolve every branch / tag in the suites' ``revisions`` to the commit it is at now (internet), print the
    pinned blocks and, with ``--write``, put them into the config file; ``--check``: no network, exit 2 unless
    every hub model and dataset is pinned to a commit."""
    import copy

    import yaml

    from epmq.io import write_text_atomic
    from epmq.models.sources import hub_commit, is_commit

    grid = _grid(args)
    pins = _hub_pins(grid)
    if not pins:
        print(f"{args.config}: no suite reads from the hub; nothing to pin")
        return
    if args.check:
        loose = [f"{sid}: {kind[:-1]} {i} ({rev or 'no revision'})" for sid, p in pins.items()
                 for kind, revs in p.items() for i, rev in revs.items() if not is_commit(rev)]
        if loose:
            raise EPMQError(f"{args.config}: {len(loose)} hub source(s) not pinned to a commit: " + "; ".join(loose)
                            + f" -- run `epmq pin --config {args.config} --write` on a machine with internet")
        n = sum(len(r) for p in pins.values() for r in p.values())
        print(f"{args.config}: all {n} hub models and datasets are pinned to commits")
        return
    resolved, problems = {}, []
    for sid, p in pins.items():
        resolved[sid] = {}
        for kind, revs in p.items():
            resolved[sid][kind] = {}
            for hub_id, rev in revs.items():
                try:
                    sha = rev if is_commit(rev) else hub_commit(hub_id, rev or "main", repo_type=kind[:-1])
                except EPMQError as e:
                    problems.append(str(e))
                    continue
                resolved[sid][kind][hub_id] = sha
    if problems:
        raise EPMQError(f"{len(problems)} revision(s) could not be resolved: " + "; ".join(problems))
    for sid, r in resolved.items():
        print(f"# suites.{sid}.options.revisions (each branch / tag resolved to the commit it is at now)")
        print(yaml.safe_dump({"revisions": r}, sort_keys=False).rstrip())
    if not args.write:
        return
    path = Path(args.config)
    text = path.read_text()
    raw = yaml.safe_load(text)
    want = copy.deepcopy(raw)
    new = text
    for sid, r in resolved.items():
        opts = (want["suites"][sid] or {}).setdefault("options", {})
        if not isinstance(opts.get("revisions"), dict):
            raise EPMQError(f"{path}: suites.{sid}.options has no revisions block to write into: paste the block "
                            "printed above under its options, then run again")
        for kind, revs in r.items():
            opts["revisions"].setdefault(kind, {}).update(revs)
        new = _rewrite_revisions(new, sid, r)
    if yaml.safe_load(new) != want:  # the line edit must change exactly the revisions, nothing else
        raise EPMQError(f"{path}: its layout is not one `epmq pin --write` can edit safely (every hub id on its "
                        "own line under revisions.models / revisions.datasets); paste the block printed above")
    write_text_atomic(path, new)
    print(f"wrote {path}")


def cmd_digest(args):
    from epmq.report import digest as dg

    d = dg.digest(args.folder)
    if args.out:
        from epmq.io import write_text_atomic

        write_text_atomic(args.out, dg.dumps(d))
    if args.against is None:
        if not args.out:
            sys.stdout.write(dg.dumps(d))
        return
    diff = dg.compare(dg.loads(Path(args.against).read_text()), d)
    for line in diff:
        print(line)
    if diff:
        raise EPMQError(f"{len(diff)} of {len(d)} files differ from {args.against}")
    print(f"{len(d)} files, identical to {args.against}")


def cmd_run(args, extra):
    import shutil

    exe = shutil.which("snakemake") or str(Path(sys.executable).parent / "snakemake")
    cmd = [exe, "--cores", args.cores, "--directory", str(ROOT), "--snakefile", str(ROOT / "Snakefile")]
    if args.config != "config.yaml":
        cmd += ["--configfile", str(Path(args.config).resolve())]
    cmd += extra
    print("+ " + " ".join(cmd), flush=True)
    os.execv(exe, cmd)


def _quantizer_help() -> tuple[str, str]:
    """``quantize``'s description and ``--method``'s help, from the quantizer registry (imports no torch)."""
    from epmq.quant import METHODS

    main = ", ".join(q.display for q in METHODS.values() if not q.ablation)
    return f"quantize a merged model ({main}, ablations)", "one of " + ", ".join(METHODS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="epmq", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name, help_, suite=True):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--config", default="config.yaml", help="workflow config (default: config.yaml)")
        sp.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's)")
        if suite:
            sp.add_argument("--suite", required=True, help="suite id (a key of suites: in the config)")
        return sp

    sp = add("build", "pretrain the base, compute the heads, fine-tune the experts")
    sp.add_argument("--task", help="only this expert")
    sp = add("merge", "merge the experts (hyperparameters in select: chosen on validation)")
    sp.add_argument("--merge", required=True, help="merge id (a key of merges: in the config)")
    sp.add_argument("--out", help="output .safetensors (default: the workflow's path)")
    sp = add("calibrate", "draw the calibration batches of every task")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--n", type=int, help="examples per task (default: the config's)")
    sp.add_argument("--out")
    quantize_help, method_help = _quantizer_help()
    sp = add("quantize", quantize_help)
    sp.add_argument("--merge", required=True)
    sp.add_argument("--method", required=True, help=method_help)
    sp.add_argument("--bits", type=int, required=True)
    sp.add_argument("--group-size", type=int, default=-1)
    sp.add_argument("--seed", type=int, default=0, help="calibration seed")
    sp.add_argument("--set", action="append", metavar="KNOB=VALUE", help="override a quantizer knob "
                    "(e.g. lam_w=0.1); repeatable")
    sp.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: the config's)")
    sp.add_argument("--out")
    sp.add_argument("--packed", metavar="DIR", help="also write the packed low-bit checkpoint (deployable; "
                    "reload with epmq.quant.packed.load_quantized)")
    sp = add("export", "quantize one cell and write a folder other tools load (gptq, compressed-tensors, epmq)")
    sp.add_argument("--merge", required=True)
    sp.add_argument("--method", required=True, help=method_help)
    sp.add_argument("--bits", type=int, required=True)
    sp.add_argument("--group-size", type=int, default=-1)
    sp.add_argument("--seed", type=int, default=0, help="calibration seed")
    sp.add_argument("--set", action="append", metavar="KNOB=VALUE", help="quantizer knob override; repeatable")
    sp.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: the config's)")
    sp.add_argument("--format", default="gptq", choices=["gptq", "compressed-tensors", "epmq"])
    sp.add_argument("--gptq-format", default="gptq", choices=["gptq", "gptq_v2"],
                    help="GPTQ checkpoint_format (v1 stores zero-1 and cannot hold a zero point of 0)")
    sp.add_argument("--scale-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="compressed-tensors scale dtype (float32: bit-exact)")
    sp.add_argument("--from-packed", metavar="DIR", help="export this `epmq quantize --packed` folder instead of "
                    "quantizing again (--merge/--method/--bits/--seed still name the cell for the model card)")
    sp.add_argument("--out", required=True, help="folder to write (replaced atomically)")
    sp = add("evaluate", "test accuracy of one model on every task of its suite")
    sp.add_argument("--model", required=True, help="base | experts/<task> | merged/<merge> | "
                    "quant/<merge>/<quantizer>/w<bits>g<group>/s<seed>")
    sp.add_argument("--weights", help="weights to evaluate (default: the workflow's path for --model)")
    sp.add_argument("--out")
    sp = add("report", "write the leaderboard from the grid's eval records", suite=False)
    sp.add_argument("--out", help="folder (default: the config's reports:)")
    sp.add_argument("--partial", action="store_true", help="use the records that exist")
    add("grid", "show what the config expands to", suite=False).add_argument("-v", "--verbose",
                                                                           action="store_true")
    sp = add("pin", "pin the hub suites' revisions: resolve each branch / tag to its commit (needs internet)",
             suite=False)
    how = sp.add_mutually_exclusive_group()
    how.add_argument("--write", action="store_true", help="write the commits into the config file")
    how.add_argument("--check", action="store_true", help="no network: fail unless every hub model and dataset "
                     "is pinned to a commit")
    sp = sub.add_parser("digest", help="hash every record (timings left out) and weight file of a results folder",
                        description="hash every record (timings left out) and weight file of a results folder")
    sp.add_argument("folder")
    sp.add_argument("--out", help="write the digest to this file")
    sp.add_argument("--against", help="compare with a digest written before; exit 2 on any difference")
    sp = sub.add_parser("run", help="run the whole DAG with Snakemake (extra options go to snakemake)",
                        description="snakemake --cores CORES [--configfile CONFIG] [extra snakemake options]")
    sp.add_argument("--config", default="config.yaml")
    sp.add_argument("--cores", default="all")

    args, extra = p.parse_known_args(argv)
    if extra and args.cmd != "run":
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.cmd == "run":
            cmd_run(args, [e for e in extra if e != "--"])
        else:
            globals()[f"cmd_{args.cmd}"](args)
    except EPMQError as err:
        print(f"epmq {args.cmd}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
