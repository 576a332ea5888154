"""benchmarks/compare_rows.py: rows of several results_dirs paired by seed."""

import json

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
        {"complete": complete, "stages": [],
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
