"""`epmq digest`: timings and provenance do not count, results and weight bytes do."""

import json

import pytest

from epmq.cli import main
from epmq.errors import EPMQError
from epmq.report import digest as dg


def _safetensors(data: bytes, meta_order=("a", "b")) -> bytes:
    header = json.dumps({"__metadata__": {k: k for k in meta_order},
                         "w": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]}}).encode()
    return len(header).to_bytes(8, "little") + header + data


def _tree(root, acc=0.5, seconds=1.0, weights=_safetensors(b"abc")):
    (root / "s" / "eval").mkdir(parents=True)
    rec = {"tasks": {"a": {"accuracy": acc}}, "cost": {"quantize_seconds": seconds}, "eval_seconds": seconds,
           "provenance": {"git_sha": str(seconds)}, "trials": [{"seconds": seconds, "params": {"lam": 0.3}}],
           "train_seconds": seconds}
    (root / "s" / "eval" / "m.json").write_text(json.dumps(rec))
    (root / "s" / "merged.safetensors").write_bytes(weights)
    (root / "s" / "run.log").write_text(str(seconds))  # not part of the digest
    return root


def test_timings_do_not_count_results_do(tmp_path):
    a = dg.digest(_tree(tmp_path / "a"))
    assert sorted(a) == ["s/eval/m.json", "s/merged.safetensors"]
    assert dg.compare(a, dg.digest(_tree(tmp_path / "b", seconds=9.0))) == []
    assert dg.compare(a, dg.digest(_tree(tmp_path / "c", acc=0.6))) == ["changed  s/eval/m.json"]
    assert dg.compare(a, dg.digest(_tree(tmp_path / "d", weights=_safetensors(b"abd")))) == [
        "changed  s/merged.safetensors"]
    # safetensors writes its metadata map in any key order: the parsed header counts, not its text
    assert dg.compare(a, dg.digest(_tree(tmp_path / "e", weights=_safetensors(b"abc", ("b", "a"))))) == []


def test_cli_round_trip_and_difference(tmp_path, capsys):
    _tree(tmp_path / "a")
    _tree(tmp_path / "b", acc=0.6)
    out = tmp_path / "before.txt"
    assert main(["digest", str(tmp_path / "a"), "--out", str(out)]) == 0
    assert dg.loads(out.read_text()) == dg.digest(tmp_path / "a")
    assert main(["digest", str(tmp_path / "a"), "--against", str(out)]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(["digest", str(tmp_path / "b"), "--against", str(out)]) == 2
    captured = capsys.readouterr()
    assert "changed  s/eval/m.json" in captured.out and "1 of 2 files differ" in captured.err


def test_bad_digest_line(tmp_path):
    with pytest.raises(EPMQError, match="digest line 1"):
        dg.loads("nothash path\n")
