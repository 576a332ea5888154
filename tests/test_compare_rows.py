"""benchmarks/compare_rows.py: rows of several results_dirs paired by seed."""

import json
import os

import numpy as np
import pytest
from scipy import stats


@pytest.fixture(scope="module")
def cr(load_benchmark):
    return load_benchmark("compare_rows")


def finished(results_dir, rel, method, top1, test_top1, complete=True):
    d = results_dir / rel
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(
        {"complete": complete, "stages": [], "final_model": "stages/last/model.keras",
         "methods": {method: {"top1": top1, "top5": 0.9, "test_top1": test_top1}}}))


@pytest.fixture
def dirs(tmp_path):
    """Feature-map and logit guidance in two results_dirs, seed 3 of one row unfinished."""
    a, b = tmp_path / "a", tmp_path / "b"
    holdout = {"base": [0.60, 0.62, 0.61], "fm": [0.63, 0.61, 0.65], "logits": [0.66, 0.64, 0.64]}
    test = {"base": [0.58, 0.60, 0.59], "fm": [0.60, 0.61, 0.58], "logits": [0.61, 0.59, 0.60]}
    for i, s in enumerate((1, 2, 3)):
        finished(a, f"relu/seed{s}/w2/baseline", "baseline", holdout["base"][i], test["base"][i])
        finished(a, f"relu/seed{s}/w2/pq+ts+guided_fp_first_last", "pq+ts+guided",
                 holdout["fm"][i], test["fm"][i])
        finished(b, f"relu/seed{s}/w2/pq+ts+guided_fp_first_last", "pq+ts+guided",
                 holdout["logits"][i], test["logits"][i], complete=s != 3)
    rows = [f"Baseline={a}:baseline", f"FM={a}:pq+ts+guided**", f"Logits={b}:pq+ts+guided**"]
    return rows, holdout, test


def t_interval(x):
    x = np.asarray(x)
    h = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return x.mean() - h, x.mean() + h


def test_pairs_by_seed_on_both_splits(cr, dirs):
    rows, holdout, test = dirs
    result = cr.compare([cr.parse_row(r) for r in rows], [("Logits", "FM"), ("FM", "Baseline"), ("FM", "Logits")],
                        seeds=[1, 2, 3], bits=2)
    for split, ref in (("tuning", holdout), ("reported", test)):
        t = result[split]
        assert t["rows"]["Logits"]["per_seed"][3] is None  # unfinished: left out
        assert t["rows"]["Logits"]["mean"] == pytest.approx(100 * np.mean(ref["logits"][:2]))
        assert t["rows"]["FM"]["mean"] == pytest.approx(100 * np.mean(ref["fm"]))
        logits_fm, fm_base, fm_logits = t["changes"]
        # The reference's missing seed drops out as well.
        assert list(fm_logits["per_seed"]) == [1, 2] and fm_logits["n"] == 2
        want = 100 * (np.array(ref["logits"][:2]) - ref["fm"][:2])  # seeds both finished
        assert list(logits_fm["per_seed"]) == [1, 2] and logits_fm["n"] == 2
        assert list(logits_fm["per_seed"].values()) == pytest.approx(want)
        assert logits_fm["interval"] == pytest.approx(t_interval(want))
        assert logits_fm["above"] == int((want > 0).sum())
        want = 100 * (np.array(ref["fm"]) - ref["base"])
        assert fm_base["mean"] == pytest.approx(want.mean())
        assert fm_base["interval"] == pytest.approx(t_interval(want))
        assert fm_base["above"] == int((want > 0).sum()) and fm_base["n"] == 3


def test_cli_prints_tables_and_writes_json(cr, dirs, tmp_path):
    rows, holdout, _ = dirs
    printed = []
    out = tmp_path / "cmp.json"
    assert cr.main(["--bits=2", "--seeds=1,2,3", *rows, f"--json={out}"], out=printed.append) == 0
    text = "\n".join(printed)
    # Without --change: every row against the first.
    assert "| FM - Baseline |" in text and "| Logits - Baseline |" in text
    assert "**holdout (tuning)**" in text and "**test (reported)**" in text
    assert "| Logits | 66.00 | 64.00 | - | 65.00 |" in text
    assert "| 2 of 2 |" in text  # logits above the Baseline on the two seeds it has
    saved = json.loads(out.read_text())
    assert saved["tuning"]["rows"]["FM"]["mean"] == pytest.approx(100 * np.mean(holdout["fm"]))


def test_unused_split_evaluates_each_kept_model_once(cr, dirs, tmp_path):
    rows, _, _ = dirs
    unused = {"a": [0.70, 0.69, 0.72], "b": [0.71, 0.71, 0.70]}  # FM (in a), Logits (in b)
    for folder, values in unused.items():
        for s, v in zip((1, 2, 3), values):
            model = tmp_path / folder / f"relu/seed{s}/w2/pq+ts+guided_fp_first_last/stages/last/model.keras"
            model.parent.mkdir(parents=True)
            model.write_text(str(v))  # the stand-in evaluator reads its top-1 from here
    calls, notes = [], []

    def evaluate(model_dir, split):
        calls.append((model_dir, split))
        return {"top1": float(open(f"{model_dir}/stages/last/model.keras").read()), "top5": 1.0,
                "loss": 0.5}

    def run():
        return cr.compare([cr.parse_row(r) for r in rows], [("Logits", "FM")], seeds=[1, 2, 3],
                          bits=2, evaluate=evaluate, note=notes.append)

    result = run()
    t = result["unused"]
    assert result["splits"] == ["tuning", "reported", "unused"]
    assert t["rows"]["FM"]["per_seed"] == pytest.approx({1: 70.0, 2: 69.0, 3: 72.0})
    assert t["rows"]["Baseline"]["per_seed"] == {1: None, 2: None, 3: None}  # no model kept
    assert len(notes) == 3 and all("final model was not kept" in n for n in notes)
    assert t["rows"]["Logits"]["per_seed"][3] is None  # unfinished row: not evaluated
    (change,) = t["changes"]
    want = 100 * (np.array(unused["b"][:2]) - unused["a"][:2])
    assert list(change["per_seed"].values()) == pytest.approx(want)
    assert change["interval"] == pytest.approx(t_interval(want))
    assert len(calls) == 5 and {split for _, split in calls} == {"unused"}
    kept = json.loads((tmp_path / "a/relu/seed2/w2/pq+ts+guided_fp_first_last/unused.json").read_text())
    assert kept["top1"] == 0.69 and kept["final_model"] == "stages/last/model.keras"
    assert "**unused training images (validation)**" in cr.format_comparison(result)

    calls.clear()
    assert run()["unused"] == t and not calls  # read back, not evaluated again
    model = tmp_path / "a/relu/seed1/w2/pq+ts+guided_fp_first_last/stages/last/model.keras"
    model.write_text("0.5")  # a rerun row: a new model, evaluated again
    os.utime(model, ns=(1, 1))
    assert run()["unused"]["rows"]["FM"]["per_seed"][1] == pytest.approx(50.0)
    assert [c for c, _ in calls] == [str(model.parent.parent.parent)]

    def broken(model_dir, split):
        raise ValueError("data moved")

    model.write_text("0.4")
    os.utime(model, ns=(2, 2))
    with pytest.raises(cr.CompareError, match="cannot evaluate on the unused images: data moved"):
        cr.compare([cr.parse_row(rows[1])], [], seeds=[1], bits=2, evaluate=broken, note=notes.append)


@pytest.mark.parametrize("argv,match", [
    (["Baseline={a}"], "expected NAME=RESULTS_DIR:ROW"),
    (["Baseline={a}:dorefa"], "unknown row 'dorefa'; accepted: fp, baseline"),
    (["Baseline={a}/missing:baseline"], "is not a folder"),
    (["A,B={a}:baseline"], "cannot hold a comma"),
    (["Baseline={a}:baseline", "Baseline={a}:guided"], "two rows share a name"),
    (["Baseline={a}:baseline", "--change=Baseline"], "expected ROW,REFERENCE"),
    (["Baseline={a}:baseline", "--change=Baseline,Guided"], "no row named 'Guided'; rows: Baseline"),
])
def test_bad_rows_and_changes_refused(cr, dirs, tmp_path, capsys, argv, match):
    argv = [x.format(a=tmp_path / "a") for x in argv]
    assert cr.main(["--bits=2", *argv], out=lambda *_: None) == 2
    assert match in capsys.readouterr().err
