"""benchmarks/ablation.py: budget rules, the row plan, resuming row by row, and a tiny real run."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "ablation.py")


@pytest.fixture(scope="module")
def ab(load_benchmark):
    return load_benchmark("ablation")


def args_for(ab, tmp_path, *extra):
    return ab.parse_args(["--dataset=digits", f"--results_dir={tmp_path / 'res'}", *extra])


# ------------------------------------------------------------------ budget rules


@pytest.mark.parametrize("budget,min_stage,n,want", [
    ("stage:3", 1, 1, [3]),
    ("stage:3", 1, 6, [3] * 6),
    ("total:8", 2, 1, [8]),
    ("total:8", 2, 2, [4, 4]),
    ("total:8", 2, 3, [2, 3, 3]),  # the remainder goes to the later stages
    ("total:8", 2, 4, [2, 2, 2, 2]),
    ("total:8", 2, 6, [2] * 6),  # the minimum wins: 12 epochs in all
    ("total:10", 1, 4, [2, 2, 3, 3]),
    ("final:8", 2, 1, [8]),  # the Baseline: as long as under total:8
    ("final:8", 2, 3, [2, 2, 8]),
    ("final:5", 1, 6, [1, 1, 1, 1, 1, 5]),
])
def test_budget_split(ab, budget, min_stage, n, want):
    got = ab.parse_budget(budget, min_stage).split(n)
    assert got == want
    if budget.startswith("total") and n * min_stage <= int(budget.split(":")[1]):
        assert sum(got) == int(budget.split(":")[1])


@pytest.mark.parametrize("text", ["stage", "stage:0", "total:-2", "epochs:3", "total:x", "",
                                  "final:0", "final"])
def test_bad_budget_rejected(ab, text):
    with pytest.raises(ab.AblationError, match="stage:N, total:N or final:N"):
        ab.parse_budget(text)


# ------------------------------------------------------------------ the plan


def test_default_rows_stages_and_commands(ab, tmp_path):
    args = args_for(ab, tmp_path, "--budget=stage:3", "--fp_epochs=7", "--holdout=100")
    rows = ab.plan_rows(args)
    assert [r.key for r in rows] == ["fp"] + list(ab.ROWS[1:]) * 2
    assert [r.bits for r in rows] == [None] + [4] * 9 + [2] * 9
    fp = rows[0]
    # The long Baseline: as many epochs as PQ+TS, 4 (4 bits) or 6 (2 bits) stages of 3.
    long = {r.bits: r for r in rows if r.key == "baseline_long"}
    assert (long[4].epochs, long[2].epochs) == (12, 18)
    rows = [r for r in rows if r.key != "baseline_long"]
    assert "--method=fp" in fp.argv and "--epochs=7" in fp.argv and fp.epochs == 7
    stages = {(r.bits, r.key): [(w, a, g) for _, w, a, g, _ in r.stages] for r in rows[1:]}
    # Stage counts of the paper's methods, from tfq.precision.plan_stages.
    assert stages[(2, "ts")] == [(2, 32, False), (2, 2, False)]
    assert stages[(2, "pq")] == [(8, 8, False), (4, 4, False), (2, 2, False)]
    assert stages[(4, "pq")] == [(8, 8, False), (4, 4, False)]
    assert stages[(2, "pq+ts")] == [(8, 32, False), (4, 32, False), (2, 32, False),
                                    (2, 8, False), (2, 4, False), (2, 2, False)]
    assert stages[(4, "pq+ts")] == [(8, 32, False), (4, 32, False), (4, 8, False), (4, 4, False)]
    assert all(g for _, _, g in stages[(2, "pq+ts+guided")])
    assert stages[(2, "pq+ts+guided")] == stages[(2, "pq+ts+guided**")]
    fp_dir = os.path.join(args.results_dir, "clip", "seed0", "fp")
    for r in rows[1:]:
        assert r.epochs == 3 * len(r.stages)
        assert f"--stage_epochs={','.join(['3'] * len(r.stages))}" in r.argv
        assert f"--bits={r.bits}" in r.argv and "--seed=0" in r.argv and "--fp_activation=clip" in r.argv
        assert r.model_dir.startswith(os.path.join(args.results_dir, "clip", "seed0", f"w{r.bits}"))
        pinned = r.key.endswith("**")
        assert ("--fp_first_last" in r.argv) == pinned
        assert f"--init_from={fp_dir}" in r.argv  # the CLI pins ** layers itself
    assert len({r.model_dir for r in rows}) == len(rows)


def test_total_budget_and_filters(ab, tmp_path):
    args = args_for(ab, tmp_path, "--budget=total:6", "--min_stage_epochs=2", "--bits=2",
                    "--rows=ts,pq+ts", "--fp_activation=both", "--seeds=0,3",
                    "--extra=--steps_per_epoch=5 --deterministic")
    rows = ab.plan_rows(args)
    # The FP row comes along: every quantized row starts from it.
    assert [(r.seed, r.fp_activation, r.key) for r in rows] == [
        (s, a, k) for s in (0, 3) for a in ("relu", "clip") for k in ("fp", "ts", "pq+ts")]
    ts = rows[1]
    assert [s[4] for s in ts.stages] == [3, 3]
    assert [s[4] for s in rows[2].stages] == [2] * 6  # minimum per stage beats the total
    assert ts.argv[-2:] == ("--steps_per_epoch=5", "--deterministic")
    assert "--fp_activation=relu" in ts.argv and "--seed=0" in ts.argv
    assert "--seed=3" in rows[-1].argv and "--fp_activation=clip" in rows[-1].argv


@pytest.mark.parametrize("argv,match", [
    (["--rows=fp,dorefa"], "accepted: fp, baseline"),
    (["--rows=baseline@0"], "baseline@N with N >= 1"),
    (["--rows=ts@10"], "unknown ['ts@10']"),
    (["--rows=baseline@ten"], "unknown ['baseline@ten']"),
    (["--bits=4,16"], "outside 1..8"),
    (["--eval_split=holdout", "--holdout=0"], "needs --holdout > 0"),
    (["--seeds=1,1"], "twice"),
    (["--budget=all:3"], "stage:N, total:N or final:N"),
    (["--seeds=a"], "integers"),
    (["--guidance_layers=scalar,"], "an empty name"),
])
def test_bad_options_rejected(ab, tmp_path, argv, match, capsys):
    with pytest.raises(SystemExit):
        args_for(ab, tmp_path, *argv)
    assert match in capsys.readouterr().err


# ------------------------------------------------------------------ resuming


def fake_results(model_dir, method, top1, top5, complete=True):
    os.makedirs(model_dir, exist_ok=True)
    results = {"complete": complete, "stages": [{"epochs": 1, "wall_time_s": 2.0}],
               "methods": {method: {"top1": top1, "top5": top5}}}
    with open(os.path.join(model_dir, "results.json"), "w") as f:
        json.dump(results, f)


def fake_partial(model_dir, epochs_done):
    os.makedirs(model_dir, exist_ok=True)
    state = {"stages": {"ts/01_w2a32": {"status": "running", "epochs_done": epochs_done,
                                        "history": [{"epoch": 1, "time_s": 3.0}]}}}
    with open(os.path.join(model_dir, "state.json"), "w") as f:
        json.dump(state, f)


def test_row_status(ab, tmp_path):
    args = args_for(ab, tmp_path, "--bits=2", "--rows=fp,baseline,ts,pq", "--budget=stage:2")
    fp, base, ts, pq = ab.plan_rows(args)
    fake_results(fp.model_dir, "fp", 0.5, 0.9)
    fake_results(base.model_dir, "baseline", 0.4, 0.8, complete=False)  # results of a killed run
    fake_partial(base.model_dir, 1)
    fake_partial(ts.model_dir, 0)
    assert ab.row_status(fp) == {"status": "done", "epochs_done": 1, "top1": 0.5, "top5": 0.9,
                                 "eval_top1": 0.5, "wall_s": 2.0}
    # With a final --test_split evaluation, the table reports it, not the holdout.
    with open(os.path.join(fp.model_dir, "results.json")) as f:
        res = json.load(f)
    res["methods"]["fp"].update(test_top1=0.45, test_top5=0.85)
    with open(os.path.join(fp.model_dir, "results.json"), "w") as f:
        json.dump(res, f)
    st = ab.row_status(fp)
    assert (st["top1"], st["top5"], st["eval_top1"]) == (0.45, 0.85, 0.5)
    assert ab.row_status(base)["status"] == "partial" and ab.row_status(base)["epochs_done"] == 1
    assert ab.row_status(ts)["status"] == "pending"
    assert ab.row_status(pq) == {"status": "pending", "epochs_done": 0, "wall_s": 0}


def test_finished_row_with_another_config_refused(ab, tmp_path):
    args = args_for(ab, tmp_path, "--bits=2", "--rows=baseline", "--holdout=50")
    fp, base = ab.plan_rows(args)
    fake_results(fp.model_dir, "fp", 0.5, 0.9)
    fake_results(base.model_dir, "baseline", 0.4, 0.8)
    from absl import flags

    from tfq import train

    flags.FLAGS(["tfq.train", *base.argv])
    try:
        saved = json.loads(json.dumps(train.config_from_flags().to_dict()))
    finally:
        flags.FLAGS.unparse_flags()
    config = os.path.join(base.model_dir, "config.json")
    with open(config, "w") as f:
        json.dump({**saved, "init_from": "/elsewhere"}, f)  # resume-free keys may differ
    assert ab.row_status(base)["status"] == "done"
    with open(config, "w") as f:
        json.dump({**saved, "lr": 0.5, "stage_epochs": [3]}, f)
    with pytest.raises(ab.AblationError, match=r"another config \(lr: 0.5 -> 0.001, "
                                               r"stage_epochs: \[3\] -> \[8\]\)"):
        ab.row_status(base)


def test_shared_fp_results_dir(ab, tmp_path):
    args = args_for(ab, tmp_path, "--bits=2", "--rows=guided,pq+ts+guided**", "--holdout=50",
                    f"--fp_results_dir={tmp_path / 'main'}")
    fp, guided, pinned = ab.plan_rows(args)
    main_fp = str(tmp_path / "main" / "clip" / "seed0" / "fp")
    assert fp.model_dir == main_fp and guided.fp_dir == main_fp
    assert f"--init_from={main_fp}" in guided.argv
    assert pinned.init_from == main_fp and "--fp_first_last" in pinned.argv


def test_run_skips_finished_rows_and_reruns_unfinished_ones(ab, tmp_path, monkeypatch):
    args = args_for(ab, tmp_path, "--bits=2", "--rows=baseline,ts,guided", "--budget=stage:1",
                    "--seeds=0,1", "--holdout=50")
    rows = ab.plan_rows(args)
    by = {(r.seed, r.key): r for r in rows}
    fake_results(by[(0, "fp")].model_dir, "fp", 0.60, 0.95)
    fake_results(by[(0, "baseline")].model_dir, "baseline", 0.50, 0.90)
    fake_partial(by[(0, "ts")].model_dir, 1)
    calls = []
    numbers = {(0, "ts"): 0.53, (0, "guided"): 0.49, (1, "fp"): 0.62, (1, "baseline"): 0.47,
               (1, "ts"): 0.52, (1, "guided"): 0.40}

    def fake_run_row(row, args, out=print):
        calls.append((row.seed, row.key))
        if (row.seed, row.key) == (1, "guided"):
            return 1  # a failed row is reported, the others go on
        fake_results(row.model_dir, row.method, numbers[(row.seed, row.key)], 0.9)
        return 0

    monkeypatch.setattr(ab, "run_row", fake_run_row)
    printed = []
    rc = ab.run(rows, args, out=printed.append)
    assert rc == 1
    assert calls == [(0, "ts"), (0, "guided"), (1, "fp"), (1, "baseline"), (1, "ts"), (1, "guided")]
    text = "\n".join(printed)
    assert text.count("skipped") == 2 and "resuming" in text and "FAILED (exit 1)" in text
    table = json.loads((tmp_path / "res" / "table.json").read_text())
    assert [r["status"] for r in table["rows"]] == ["done"] * 7 + ["failed"]
    w2 = table["summary"]["clip"]["2"]
    assert w2["fp"]["top1"] == pytest.approx(61.0) and w2["fp"]["n"] == 2
    assert w2["baseline"]["top1"] == pytest.approx(48.5)
    # Deltas are paired per seed: TS - Baseline = +3 and +5 points.
    assert w2["ts"]["vs_baseline"] == pytest.approx(4.0)
    assert w2["ts"]["vs_baseline_sd"] == pytest.approx(2 ** 0.5)
    assert w2["ts"]["vs_fp"] == pytest.approx((-7 - 10) / 2)
    assert w2["guided"]["n"] == 1 and w2["guided"]["vs_baseline"] == pytest.approx(-1.0)
    goals = {g["goal"].split(":")[0]: g["status"] for g in table["goals"]}
    assert goals["2-bit TS, PQ, Guided each >= Baseline"] == "N/A"  # PQ not planned
    assert goals["4-bit PQ+TS+Guided within 0.5 top-1 of FP"] == "N/A"
    md = (tmp_path / "res" / "table.md").read_text()
    assert "| TS | 2 | 53.00 / 90.00 | 52.00 / 90.00 | 52.50 ± 0.71 |" in md
    assert "failed (exit 1)" in md


def test_goals_pass_fail_pending(ab, tmp_path):
    args = args_for(ab, tmp_path, "--bits=4,2", "--rows=baseline,ts,pq,guided,pq+ts+guided",
                    "--budget=stage:1", "--holdout=50", "--eval_split=test")
    rows = ab.plan_rows(args)
    top1 = {(None, "fp"): 0.700, (4, "baseline"): 0.690, (4, "pq+ts+guided"): 0.696,
            (2, "baseline"): 0.600, (2, "ts"): 0.601, (2, "pq"): 0.599, (2, "guided"): 0.610,
            (2, "pq+ts+guided"): 0.614}
    statuses = [{"status": "done", "top1": top1[(r.bits, r.key)], "top5": 0.9}
                if (r.bits, r.key) in top1 else {"status": "pending", "epochs_done": 0}
                for r in rows]
    got = {text.split(":")[0]: (status, text) for _, status, text in
           ab.goals(ab.summarize(rows, statuses, args), args)}
    assert got["4-bit PQ+TS+Guided within 0.5 top-1 of FP"][0] == "PASS"  # -0.4 points
    assert got["2-bit PQ+TS+Guided >= 1.5 above Baseline"][0] == "FAIL"  # +1.4 points
    status, text = got["2-bit TS, PQ, Guided each >= Baseline"]
    assert status == "FAIL" and "PQ -0.10" in text and "TS +0.10" in text
    guided2 = next(i for i, r in enumerate(rows) if (r.bits, r.key) == (2, "guided"))
    statuses[guided2] = {"status": "pending", "epochs_done": 0}
    got = {text.split(":")[0]: status for _, status, text in
           ab.goals(ab.summarize(rows, statuses, args), args)}
    assert got["2-bit TS, PQ, Guided each >= Baseline"] == "PENDING"
    base2 = next(i for i, r in enumerate(rows) if (r.bits, r.key) == (2, "baseline"))
    statuses[base2] = {"status": "pending", "epochs_done": 0}
    got = {text.split(":")[0]: (status, text) for _, status, text in
           ab.goals(ab.summarize(rows, statuses, args), args)}
    status, text = got["2-bit TS, PQ, Guided each >= Baseline"]
    assert status == "PENDING" and text.endswith("waiting for Baseline, Guided")
    status, text = got["2-bit PQ+TS+Guided >= 1.5 above Baseline"]
    assert status == "PENDING" and text.endswith("waiting for Baseline")  # the row is done
    # A table planned without a Baseline (another option's rows alone): no goal.
    args = args_for(ab, tmp_path, "--bits=2", "--rows=guided,pq+ts+guided", "--budget=stage:1",
                    "--holdout=50", "--eval_split=test")
    rows = ab.plan_rows(args)
    statuses = [{"status": "done", "top1": top1[(r.bits, r.key)], "top5": 0.9} for r in rows]
    got = {text.split(":")[0]: (status, text) for _, status, text in
           ab.goals(ab.summarize(rows, statuses, args), args)}
    assert got["2-bit PQ+TS+Guided >= 1.5 above Baseline"] == (
        "N/A", "2-bit PQ+TS+Guided >= 1.5 above Baseline: row or bit-width not planned")
    # Both rows finished, but on different seeds: no pair yet.
    args = args_for(ab, tmp_path, "--bits=2", "--rows=baseline,pq+ts+guided", "--seeds=0,1",
                    "--budget=stage:1", "--holdout=50", "--eval_split=test")
    rows = ab.plan_rows(args)
    statuses = [{"status": "done", "top1": 0.6, "top5": 0.9}
                if (r.key, r.seed) in {("fp", 0), ("fp", 1), ("baseline", 0), ("pq+ts+guided", 1)}
                else {"status": "pending", "epochs_done": 0} for r in rows]
    got = {text.split(":")[0]: (status, text) for _, status, text in
           ab.goals(ab.summarize(rows, statuses, args), args)}
    status, text = got["2-bit PQ+TS+Guided >= 1.5 above Baseline"]
    assert status == "PENDING" and text.endswith("waiting for Baseline on the rows' seeds")


def test_goal_lines_flag_rows_trained_longer_than_the_baseline(ab, tmp_path):
    def goal_texts(budget):
        args = args_for(ab, tmp_path, "--bits=2", "--rows=baseline,ts,pq,guided,pq+ts+guided",
                        f"--budget={budget}", "--holdout=50", "--eval_split=test")
        rows = ab.plan_rows(args)
        statuses = [{"status": "done", "top1": 0.6 + 0.01 * i, "top5": 0.9}
                    for i, _ in enumerate(rows)]
        return {t.split(":")[0]: t for _, _, t in ab.goals(ab.summarize(rows, statuses, args), args)}

    # final:8 at 2 bits: Baseline 8 epochs, TS 2+8, PQ 2+2+8, Guided 8, PQ+TS+Guided 5x2+8.
    got = goal_texts("final:8")
    assert "not at equal epochs (PQ+TS+Guided 18 vs Baseline 8)" in got[
        "2-bit PQ+TS+Guided >= 1.5 above Baseline"]
    assert "(TS 10, PQ 12 vs Baseline 8)" in got["2-bit TS, PQ, Guided each >= Baseline"]
    # total:12 with 2-epoch stages: every 2-bit method gets 12 epochs, so no caveat.
    assert not any("equal epochs" in t for t in goal_texts("total:12").values())


@pytest.mark.parametrize("budget,decay,want", [
    # 2 bits, PQ sequence 32,8,4,2: PQ+TS and PQ+TS+Guided have 6 stages, the most.
    ("final:8", 6, {2: (18, 14)}),  # 5 x 2 + 8 epochs; lr decay 6 x 18 / 8 = 13.5 -> 14
    ("total:8", 10, {2: (12, 15)}),  # 6 x 2 (the minimum wins); 10 x 12 / 8 = 15
    ("total:12", 10, {}),  # every method gets 12: the Baseline is the control itself
])
def test_long_baseline_row(ab, tmp_path, budget, decay, want):
    args = args_for(ab, tmp_path, "--bits=4,2", "--rows=baseline,ts,baseline_long",
                    f"--budget={budget}", "--min_stage_epochs=2", f"--lr_decay_epochs={decay}")
    rows = [r for r in ab.plan_rows(args) if r.key == "baseline_long"]
    if budget == "final:8":  # at 4 bits PQ+TS has 4 stages: 3 x 2 + 8
        want = {4: (14, 11), **want}  # 6 x 14 / 8 = 10.5 -> 11
    assert {r.bits: (r.epochs, int(next(a for a in r.argv if a.startswith("--lr_decay_epochs="))
                                    .split("=")[1])) for r in rows} == want
    for r in rows:
        # The longest method, not the selected rows (TS only): --rows does not change it.
        assert r.method == "baseline" and "--method=baseline" in r.argv
        assert f"--stage_epochs={r.epochs}" in r.argv and len(r.stages) == 1
        assert r.model_dir.endswith(os.path.join(f"w{r.bits}", "baseline_long"))


def test_goal_lines_give_the_change_against_the_long_baseline(ab, tmp_path):
    args = args_for(ab, tmp_path, "--bits=2", "--budget=final:8", "--holdout=50",
                    "--eval_split=test", "--rows=baseline,ts,pq,guided,pq+ts+guided,baseline_long")
    rows = ab.plan_rows(args)
    top1 = {"fp": 0.70, "baseline": 0.60, "ts": 0.62, "pq": 0.615, "guided": 0.605,
            "pq+ts+guided": 0.63, "baseline_long": 0.625}
    done = [{"status": "done", "top1": top1[r.key], "top5": 0.9} for r in rows]

    def texts(statuses):
        summary = ab.summarize(rows, statuses, args)
        lines = {t.split(":")[0]: t for _, _, t in ab.goals(summary, args)}
        return summary, lines, ab.format_table(rows, statuses, summary, ab.goals(summary, args), args)

    summary, got, md = texts(done)
    assert summary["relu" if args.fp_activation == "relu" else "clip"]["2"]["pq+ts+guided"][
        "vs_baseline_long"] == pytest.approx(0.5)
    line = got["2-bit PQ+TS+Guided >= 1.5 above Baseline"]
    assert line.startswith("2-bit PQ+TS+Guided >= 1.5 above Baseline: PQ+TS+Guided +3.00")
    assert "against the Baseline trained 18 epochs: PQ+TS+Guided +0.50" in line
    assert ("against the Baseline trained 18 epochs: TS -0.50, PQ -1.00, Guided -2.00"
            in got["2-bit TS, PQ, Guided each >= Baseline"])
    assert "Δ vs Baseline (long)" in md
    assert "| Baseline (long) | 18 | 62.50 / 90.00 | 62.50 | 90.00 | +2.50 | -7.50 |  |" in md
    # Until the long Baseline has finished, the line says which row to wait for.
    pending = [s if r.key != "baseline_long" else {"status": "pending", "epochs_done": 0}
               for r, s in zip(rows, done)]
    assert "compare a Baseline trained as long (row baseline_long)" in texts(pending)[1][
        "2-bit PQ+TS+Guided >= 1.5 above Baseline"]


def test_fixed_epochs_baseline_rows(ab, tmp_path):
    # The equal-epochs controls of TS (2 + 8 epochs) and PQ (2 + 2 + 8) under final:8.
    args = args_for(ab, tmp_path, "--bits=2", "--budget=final:8", "--min_stage_epochs=2",
                    "--lr_decay_epochs=6", "--rows=baseline@12,ts,baseline,baseline@10,baseline@8")
    rows = ab.plan_rows(args)
    # baseline@8 is the Baseline itself: not planned twice. The paper's rows come first.
    assert [r.key for r in rows] == ["fp", "baseline", "ts", "baseline@10", "baseline@12"]
    decay = {r.key: next(a for a in r.argv if a.startswith("--lr_decay_epochs=")) for r in rows[1:]}
    # lr decay stretched as the long Baseline's: 6 x 10 / 8 = 7.5 -> 8, 6 x 12 / 8 = 9.
    assert decay == {"baseline": "--lr_decay_epochs=6", "ts": "--lr_decay_epochs=6",
                     "baseline@10": "--lr_decay_epochs=8", "baseline@12": "--lr_decay_epochs=9"}
    for r, n in zip(rows[3:], (10, 12)):
        assert r.method == "baseline" and "--method=baseline" in r.argv
        assert r.epochs == n and f"--stage_epochs={n}" in r.argv and len(r.stages) == 1
        assert r.model_dir.endswith(os.path.join("w2", f"baseline@{n}"))
        assert r.label.endswith(f"W2A2 Baseline ({n} ep)")


def test_change_at_equal_epochs(ab, tmp_path):
    args = args_for(ab, tmp_path, "--bits=2", "--budget=final:8", "--holdout=50", "--seeds=0,1",
                    "--eval_split=test", "--rows=baseline,ts,pq,guided,pq+ts+guided,"
                    "baseline_long,baseline@10,baseline@12")
    rows = ab.plan_rows(args)
    top1 = {"fp": 0.70, "baseline": 0.60, "ts": 0.62, "pq": 0.615, "guided": 0.605,
            "pq+ts+guided": 0.63, "baseline_long": 0.625, "baseline@10": 0.615,
            "baseline@12": 0.62}
    # Seed 1 is one point higher everywhere but in TS: paired deltas differ by seed.
    done = [{"status": "done", "top1": top1[r.key] + (0.01 if r.seed and r.key != "ts" else 0),
             "top5": 0.9} for r in rows]
    summary = ab.summarize(rows, done, args)
    table = summary[args.fp_activation]["2"]
    got = {k: (table[k]["equal_epochs_ref"], round(table[k]["vs_equal_epochs"], 6))
           for k in ("ts", "pq", "guided", "pq+ts+guided")}
    # TS: (62 - 61.5) and (62 - 62.5), mean 0; the others are one seed's delta twice.
    assert got == {"ts": ("baseline@10", 0.0), "pq": ("baseline@12", -0.5),
                   "guided": ("baseline", 0.5), "pq+ts+guided": ("baseline_long", 0.5)}
    assert table["ts"]["vs_equal_epochs_sd"] == pytest.approx(0.5 * 2 ** 0.5)
    assert "vs_equal_epochs" not in table["baseline@10"]
    lines = {t.split(":")[0]: t for _, _, t in ab.goals(summary, args)}
    third = lines["2-bit TS, PQ, Guided each >= Baseline"]
    assert "against a Baseline of the same epochs: TS +0.00 (Baseline (10 ep)), PQ -0.50 " \
           "(Baseline (12 ep))" in third
    assert "against the Baseline trained 18 epochs" in third  # still given beside it
    # PQ+TS+Guided's equal-epochs control is the long Baseline: its change is given once.
    goal = lines["2-bit PQ+TS+Guided >= 1.5 above Baseline"]
    assert "trained 18 epochs: PQ+TS+Guided +0.50" in goal and "of the same epochs" not in goal
    md = ab.format_table(rows, done, summary, ab.goals(summary, args), args)
    assert "| Δ vs Baseline (long) | Δ at equal epochs |" in md
    assert "| Baseline (12 ep) | 12 | 62.00 / 90.00 | 63.00 / 90.00 |" in md
    ts_line = next(line for line in md.splitlines() if line.startswith("| TS |"))
    assert ts_line.endswith("| +0.00 ± 0.71 |")


# Two-sided 95% Student t quantiles from a printed table (not from scipy, which the
# script uses): degrees of freedom 1, 2, 3.
T975 = {1: 12.706, 2: 4.303, 3: 3.182}


def test_paired_changes_get_a_t_interval_and_a_sign_count(ab, tmp_path):
    import numpy as np

    args = args_for(ab, tmp_path, "--bits=2", "--budget=final:8", "--holdout=50",
                    "--seeds=0,1,2,3", "--eval_split=test",
                    "--rows=baseline,ts,pq+ts+guided,baseline@10")
    rows = ab.plan_rows(args)
    base = [0.600, 0.612, 0.595, 0.604]
    gain = {"fp": [0.10, 0.09, 0.11, 0.10], "baseline": [0, 0, 0, 0],
            "ts": [0.004, -0.003, 0.009, 0.001], "baseline@10": [0.006, 0.001, 0.004, 0.007],
            "pq+ts+guided": [0.021, 0.012, 0.018, 0.009]}
    # Seed 3 of TS has not finished: its changes are over three seeds.
    statuses = [{"status": "pending", "epochs_done": 0} if (r.key, r.seed) == ("ts", 3) else
                {"status": "done", "top1": base[r.seed] + gain[r.key][r.seed], "top5": 0.9}
                for r in rows]
    summary = ab.summarize(rows, statuses, args)
    table = summary[args.fp_activation]["2"]

    def reference(a, b, seeds):
        d = 100 * (np.array(gain[a])[seeds] - np.array(gain[b])[seeds])
        half = T975[len(d) - 1] * d.std(ddof=1) / np.sqrt(len(d))
        return d.mean(), d.mean() - half, d.mean() + half, int((d > 0).sum()), len(d)

    for key, field, ref, seeds in [
            ("pq+ts+guided", "vs_baseline", "baseline", [0, 1, 2, 3]),
            ("ts", "vs_baseline", "baseline", [0, 1, 2]),
            ("ts", "vs_equal_epochs", "baseline@10", [0, 1, 2]),
            ("baseline@10", "vs_fp", "fp", [0, 1, 2, 3])]:
        m, lo, hi, above, n = reference(key, ref, seeds)
        t = table[key]
        assert t[field] == pytest.approx(m)
        assert t[field + "_ci"] == pytest.approx([lo, hi], abs=2e-3)  # t printed to 3 decimals
        assert (t[field + "_above"], t[field + "_n"]) == (above, n)
    # TS: +0.4, -0.3, +0.9 over the Baseline -> 2 of 3 above; below Baseline (10 ep) on 2.
    assert (table["ts"]["vs_baseline_above"], table["ts"]["vs_equal_epochs_above"]) == (2, 1)

    lines = {t.split(":")[0]: t for _, _, t in ab.goals(summary, args)}
    m, lo, hi, _, _ = reference("pq+ts+guided", "baseline", [0, 1, 2, 3])
    assert f"mean of 4 seed(s)); 95% interval PQ+TS+Guided {lo:+.2f} .. {hi:+.2f}" in lines[
        "2-bit PQ+TS+Guided >= 1.5 above Baseline"]
    md = ab.format_table(rows, statuses, summary, ab.goals(summary, args), args)
    assert "Paired changes over seeds (mean, 95% t interval of the mean, seeds above zero):" in md
    paired = md[md.index("Paired changes over seeds"):]
    row = next(line for line in paired.splitlines() if line.startswith("| PQ+TS+Guided |"))
    assert row.startswith("| PQ+TS+Guided | 18 | 4 | ") and "| 90.00 ± 0.00 |" in row and \
        f"| {m:+.2f} ({lo:+.2f} .. {hi:+.2f}; 4 of 4 above) |" in row
    ts = next(line for line in paired.splitlines() if line.startswith("| TS |"))
    assert ts.endswith("; 1 of 3 above) |")  # the last column: Δ at equal epochs

    # One seed: no interval, no second table, the goal line as before.
    one = args_for(ab, tmp_path, "--bits=2", "--budget=final:8", "--holdout=50", "--seeds=0",
                   "--eval_split=test", "--rows=baseline,pq+ts+guided")
    rows1 = ab.plan_rows(one)
    done1 = [{"status": "done", "top1": base[0] + gain[r.key][0], "top5": 0.9} for r in rows1]
    s1 = ab.summarize(rows1, done1, one)
    assert s1[one.fp_activation]["2"]["pq+ts+guided"]["vs_baseline_ci"] is None
    assert "Paired changes" not in ab.format_table(rows1, done1, s1, ab.goals(s1, one), one)
    assert not any("95% interval" in t for _, _, t in ab.goals(s1, one))


def test_table_shows_the_tuning_split_beside_the_reported_one(ab, tmp_path):
    args = args_for(ab, tmp_path, "--bits=2", "--rows=baseline,ts", "--budget=stage:1",
                    "--seeds=0,1", "--holdout=50")  # curves on holdout, table on test
    rows = ab.plan_rows(args)
    test = {"fp": (0.70, 0.72), "baseline": (0.60, 0.62), "ts": (0.61, 0.59)}
    hold = {"fp": (0.75, 0.77), "baseline": (0.64, 0.66), "ts": (0.68, 0.70)}
    statuses = [{"status": "done", "top1": test[r.key][r.seed], "top5": 0.9,
                 "eval_top1": hold[r.key][r.seed]} for r in rows]
    summary = ab.summarize(rows, statuses, args)
    ts = summary["clip"]["2"]["ts"]
    assert ts["eval_top1"] == pytest.approx(69.0) and ts["eval_top1_sd"] == pytest.approx(2 ** 0.5)
    assert ts["top1"] == pytest.approx(60.0)
    md = ab.format_table(rows, statuses, summary, ab.goals(summary, args), args)
    assert "| mean top-1 | mean top-5 | mean holdout top-1 | Δ vs Baseline |" in md
    assert ("| TS | 2 | 61.00 / 90.00 | 59.00 / 90.00 | 60.00 ± 1.41 | 90.00 ± 0.00 | 69.00 ± 1.41 "
            "| -1.00 ± 2.83 | -11.00 ± 2.83 |") in md



def test_import_table_merges_a_seed_that_ran_elsewhere(ab, tmp_path):
    """Seed 0 ran on another machine (only its table.json is left); seed 1 ran here."""
    common = ["--dataset=digits", "--bits=2", "--rows=baseline,ts", "--budget=stage:1",
              "--holdout=50"]
    elsewhere = ab.parse_args([*common, "--seeds=0", f"--results_dir={tmp_path / 'old'}"])
    old_rows = ab.plan_rows(elsewhere)
    old_top1 = {"fp": 0.70, "baseline": 0.60, "ts": 0.63}
    ab.write_outputs(old_rows, [{"status": "done", "epochs_done": r.epochs, "top1": old_top1[r.key],
                                 "top5": 0.9, "eval_top1": 0.5, "wall_s": 1.0} for r in old_rows],
                     elsewhere)
    old_table = str(tmp_path / "old" / "table.json")
    here = [*common, "--seeds=0,1", f"--results_dir={tmp_path / 'new'}"]
    for r in ab.plan_rows(ab.parse_args(here)):
        if r.seed == 1:  # what ran here
            fake_results(r.model_dir, r.method, {"fp": 0.72, "baseline": 0.61, "ts": 0.62}[r.key], 0.95)
    printed = []
    assert ab.main([*here, "--report_only", f"--import_table={old_table}"], out=printed.append) == 0
    with open(tmp_path / "new" / "table.json") as f:
        table = json.load(f)
    ts = table["summary"]["clip"]["2"]["ts"]
    # Paired per seed: seed 0 +3 points over its Baseline, seed 1 +1.
    assert ts["n"] == 2 and ts["top1"] == pytest.approx(62.5)
    assert ts["vs_baseline"] == pytest.approx(2.0) and ts["vs_baseline_sd"] == pytest.approx(2 ** 0.5)
    assert ts["vs_fp"] == pytest.approx(((63 - 70) + (62 - 72)) / 2)
    imported = [r for r in table["rows"] if r.get("imported_from")]
    assert sorted((r["key"], r["seed"]) for r in imported) == [("baseline", 0), ("fp", 0), ("ts", 0)]
    md = "\n".join(printed)
    assert "| TS | 2 | 63.00 / 90.00 | 62.00 / 95.00 | 62.50 ± 0.71 |" in md
    assert f"read from {old_table}" in md
    # What ran here wins over an imported row.
    fake_results(ab.plan_rows(ab.parse_args(here))[1].model_dir, "baseline", 0.40, 0.8)
    assert ab.main([*here, "--report_only", f"--import_table={old_table}"], out=printed.append) == 0
    with open(tmp_path / "new" / "table.json") as f:
        base0 = [r for r in json.load(f)["rows"] if (r["key"], r["seed"]) == ("baseline", 0)][0]
    assert base0["top1"] == 0.40 and "imported_from" not in base0


def test_import_table_refuses_another_protocol_or_a_bad_file(ab, tmp_path, capsys):
    common = ["--dataset=digits", "--bits=2", "--rows=baseline", "--budget=stage:1", "--holdout=50"]
    old = ab.parse_args([*common, f"--results_dir={tmp_path / 'old'}"])
    rows = ab.plan_rows(old)
    ab.write_outputs(rows, [{"status": "done", "top1": 0.6, "top5": 0.9} for _ in rows], old)
    table = str(tmp_path / "old" / "table.json")
    here = [*common, "--seeds=0,1", f"--results_dir={tmp_path / 'new'}", "--report_only"]
    assert ab.main([*here, "--lr=0.01", f"--import_table={table}"]) == 2
    assert "other options (lr: 0.001 there, 0.01 here)" in capsys.readouterr().err
    assert ab.main([*here, f"--import_table={tmp_path / 'nothing.json'}"]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"rows": [], "protocol": 3}')
    assert ab.main([*here, f"--import_table={tmp_path / 'bad.json'}"]) == 2
    assert "not a table.json of benchmarks/ablation.py" in capsys.readouterr().err
    (tmp_path / "cut.json").write_text('{"rows": [')
    assert ab.main([*here, f"--import_table={tmp_path / 'cut.json'}"]) == 2
    assert "cannot read it" in capsys.readouterr().err
    with open(table) as f:
        good = json.load(f)
    (tmp_path / "odd.json").write_text(json.dumps({**good, "rows": [{"status": "done", "key": "fp"}]}))
    assert ab.main([*here, f"--import_table={tmp_path / 'odd.json'}"]) == 2
    assert "a finished row lacks a field" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # it never trains: an imported FP model is not here
        ab.parse_args([*common, f"--results_dir={tmp_path / 'new'}", f"--import_table={table}"])
    assert "--import_table only works with --report_only" in capsys.readouterr().err
    # A row planned with other stages than the table's is not filled in, and says why.
    other = ab.parse_args([*common, f"--results_dir={tmp_path / 'new2'}"])
    planned = ab.plan_rows(other)
    with open(table) as f:
        report = json.load(f)
    report["rows"][1]["stages"][0]["epochs"] = 5
    with open(table, "w") as f:
        json.dump(report, f)
    got = ab.import_statuses(planned, [{"status": "pending", "epochs_done": 0}] * 2, [table], other)
    assert got[0]["status"] == "done" and got[1]["status"] == "pending"
    assert "other stages" in got[1]["note"]

def test_mean_curve_averages_the_finished_seeds(ab):
    import numpy as np

    stages = ["s1", "s1", "s2", "s2"]
    tops = np.array([[0.60, 0.64, 0.55, 0.66], [0.58, 0.65, 0.57, 0.69], [0.62, 0.60, 0.59, 0.63]])
    curves = [[(31 + k, float(v), stages[k]) for k, v in enumerate(seed)] for seed in tops]
    running = [(31, 0.10, "s1"), (32, 0.20, "s1")]  # a seed still in its first stage
    mean, n = ab.mean_curve(curves + [running])
    assert n == 3
    assert [e for e, _, _ in mean] == [31, 32, 33, 34] and [s for _, _, s in mean] == stages
    assert [v for _, v, _ in mean] == pytest.approx(tops.mean(axis=0))
    assert ab.mean_curve([running]) == (running, 1)


def test_changes_plot_pairs_each_seed_with_the_baseline(ab, tmp_path):
    import numpy as np

    args = args_for(ab, tmp_path, "--bits=2,4", "--budget=final:8", "--holdout=50",
                    "--seeds=0,1,2", "--eval_split=test", "--rows=baseline,ts,baseline@10")
    rows = ab.plan_rows(args)
    base = np.array([0.600, 0.612, 0.595])
    gain = {"fp": [0.10, 0.09, 0.11], "baseline": [0, 0, 0], "ts": [0.004, -0.003, 0.009],
            "baseline@10": [0.006, 0.001, 0.004]}
    # Seed 1 of the 2-bit Baseline has not finished: TS pairs with it on seeds 0 and 2.
    statuses = [{"status": "pending", "epochs_done": 0} if (r.key, r.seed, r.bits) == (
        "baseline", 1, 2) else {"status": "done", "top1": base[r.seed] + gain[r.key][r.seed],
                                "top5": 0.9} for r in rows]
    summary = ab.summarize(rows, statuses, args)
    w2, w4 = summary[args.fp_activation]["2"], summary[args.fp_activation]["4"]
    want = 100 * (np.array(gain["ts"]) - np.array(gain["baseline@10"]))
    assert ab.paired_changes(w4, "ts", "baseline@10") == pytest.approx(dict(zip("012", want)))
    assert ab.paired_changes(w2, "ts", "baseline") == pytest.approx(
        {"0": 0.4, "2": 0.9})
    assert ab.paired_changes(w2, "ts", "baseline_long") == {}  # not planned: nothing to pair
    # What the plot draws: TS against the Baseline and against Baseline (10 ep), its
    # epochs; the Baseline (10 ep) only against the Baseline.
    marks = ab.change_marks(w4)
    assert [(f, ref, sorted(c)) for f, ref, c in marks["ts"]] == [
        ("vs_baseline", "baseline", ["0", "1", "2"]),
        ("vs_equal_epochs", "baseline@10", ["0", "1", "2"])]
    assert [(f, ref) for f, ref, _ in marks["baseline@10"]] == [("vs_baseline", "baseline")]
    assert list(marks) == ["ts", "baseline@10"]

    path = tmp_path / "changes.png"
    ab.plot_changes(summary, str(path), args)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # No Baseline planned: TS still has its change at equal epochs to draw.
    no_base = args_for(ab, tmp_path, "--bits=2", "--budget=final:8", "--holdout=50",
                       "--seeds=0", "--eval_split=test", "--rows=ts,baseline@10")
    planned = ab.plan_rows(no_base)
    done = [{"status": "done", "top1": 0.6, "top5": 0.9} for _ in planned]
    no_base_summary = ab.summarize(planned, done, no_base)
    assert [(f, ref) for f, ref, _ in ab.change_marks(no_base_summary[no_base.fp_activation]["2"])[
        "ts"]] == [("vs_equal_epochs", "baseline@10")]
    ab.plot_changes(no_base_summary, str(tmp_path / "no_base.png"), no_base)
    assert (tmp_path / "no_base.png").exists()
    # Only a Baseline finished: nothing to draw, and no file.
    only = [{"status": "done", "top1": 0.6, "top5": 0.9} if r.key in ("fp", "baseline") else
            {"status": "pending", "epochs_done": 0} for r in rows]
    empty = tmp_path / "empty.png"
    assert ab.change_marks(ab.summarize(rows, only, args)[args.fp_activation]["2"]) == {}
    ab.plot_changes(ab.summarize(rows, only, args), str(empty), args)
    assert not empty.exists()


def test_curve_panels_zoom_on_the_quantized_epochs(ab):
    # FP climbs from 30% to 75% over 10 epochs; the methods move between 60% and 72%.
    fp = [(e, 30 + 4.5 * e) for e in range(1, 11)]
    quantized = [(11, 60.0), (12, 66.0), (13, 72.0), (11, 64.0), (12, 70.0)]
    (x_lo, x_hi), (y_lo, y_hi) = ab.zoom_limits(fp + quantized, fp_epochs=10, fp_tail=3)
    # In view: FP epochs 8-10 (66, 70.5, 75) and the quantized points (60..72).
    assert (x_lo, x_hi) == (7.5, 13.5)
    pad = (75 - 60) * 0.08
    assert (y_lo, y_hi) == pytest.approx((60 - pad, 75 + pad))
    assert ab.zoom_limits(fp, fp_epochs=10) is None  # nothing quantized yet: no zoom
    (_, _), (lo, hi) = ab.zoom_limits([(10, 70.0), (11, 70.1)], fp_epochs=10)
    assert (lo, hi) == pytest.approx((69.5, 70.6))  # a flat panel still gets +-0.5 points


def test_guidance_layers_go_to_the_guided_rows_only(ab, tmp_path):
    args = args_for(ab, tmp_path, "--bits=2", "--rows=baseline,ts,guided,pq+ts+guided",
                    "--guidance_layers=scalar,fc")
    rows = {r.key: r for r in ab.plan_rows(args)}
    for key, guided in (("fp", False), ("baseline", False), ("ts", False), ("guided", True),
                        ("pq+ts+guided", True)):
        assert ("--guidance_layers=scalar,fc" in rows[key].argv) == guided, key
    os.makedirs(rows["fp"].model_dir)  # the CLI checks that --init_from exists
    from absl import flags

    from tfq import train

    flags.FLAGS(["tfq.train", *rows["guided"].argv])
    try:
        assert train.config_from_flags().guidance_layers == ("scalar", "fc")
    finally:
        flags.FLAGS.unparse_flags()
    default = {r.key: r for r in ab.plan_rows(args_for(ab, tmp_path, "--bits=2", "--rows=guided"))}
    assert not any(a.startswith("--guidance_layers") for a in default["guided"].argv)


def test_guidance_layers_belong_to_the_protocol(ab, tmp_path):
    ab.check_protocol(args_for(ab, tmp_path), write=True)
    # protocol.json of a run from before the option: it reads as the default.
    path = tmp_path / "res" / "protocol.json"
    old = json.loads(path.read_text())
    del old["guidance_layers"]
    path.write_text(json.dumps(old))
    ab.check_protocol(args_for(ab, tmp_path), write=False)
    with pytest.raises(ab.AblationError, match=r"guidance_layers: None -> \['scalar'\]"):
        ab.check_protocol(args_for(ab, tmp_path, "--guidance_layers=scalar"), write=False)


def test_other_protocol_in_results_dir_refused(ab, tmp_path):
    args = args_for(ab, tmp_path, "--budget=stage:2")
    ab.check_protocol(args, write=True)
    ab.check_protocol(args, write=True)  # same options: fine
    other = args_for(ab, tmp_path, "--budget=stage:3")
    with pytest.raises(ab.AblationError, match="budget: 'stage:2' -> 'stage:3'"):
        ab.check_protocol(other, write=False)


# ------------------------------------------------------------------ the script itself


def script(*argv):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "-1"}
    return subprocess.run([sys.executable, SCRIPT, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_dry_run_prints_plan_and_estimate_and_writes_nothing(ab, tmp_path):
    res = tmp_path / "res"
    printed = []
    rc = ab.main(["--dataset=digits", "--dry_run", "--images_per_second=100", "--budget=stage:2",
                  "--fp_epochs=3", "--train_limit=500", "--holdout=100", f"--results_dir={res}"],
                 out=printed.append)
    assert rc == 0
    out = "\n".join(printed)
    assert out.count("-m tfq.train") == 19
    # 3 FP epochs + 2 per stage: 4 bits 1+2+2+1+4+2+4+4 stages, 2 bits 1+2+3+1+6+2+6+6,
    # and the long Baselines as long as the longest of those (4 and 6 stages).
    assert "planned: 117 epochs in 19 rows (3 full-precision, 114 quantized" in out
    assert "500 training and 100 holdout images per epoch" in out
    assert "estimated compute:" in out
    assert not res.exists()


@pytest.mark.parametrize("argv,match", [
    (["--model=vgg16"], "--model: unknown model 'vgg16'; known models: alexnet"),
    (["--model=resnet20", "--guidance_layers=scalar,fc9"],
     r"\['fc9'\] are not layers of resnet20; its guidance points are stage2_block3_out"),
])
def test_bad_model_or_guidance_layers_refused_before_any_row(ab, tmp_path, capsys, argv, match):
    res = tmp_path / "res"
    rc = ab.main(["--dataset=digits", "--bits=2", "--rows=baseline,guided",
                  f"--results_dir={res}", *argv], out=lambda *_: None)
    assert rc == 2
    assert re.search(match, capsys.readouterr().err)
    assert not res.exists()  # nothing written: a corrected rerun is not refused
    # Without a guided row the names are not used, so not checked.
    assert ab.main(["--dataset=digits", "--bits=2", "--rows=baseline", "--dry_run",
                    "--images_per_second=100", "--model=resnet20", "--guidance_layers=fc9",
                    f"--results_dir={res}"], out=lambda *_: None) == 0


def test_tiny_end_to_end_on_digits_then_skip(ab, tmp_path):
    res = tmp_path / "res"
    argv = ["--dataset=digits", "--bits=2", "--rows=fp,baseline,ts", "--fp_epochs=1",
            "--budget=stage:1", "--train_limit=128", "--holdout=64", "--eval_split=holdout",
            "--eval_limit=32", "--batch_size=32", f"--results_dir={res}", "--quiet",
            "--extra=--steps_per_epoch=2"]
    r = script(*argv)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = json.loads((res / "table.json").read_text())
    assert [(row["key"], row["status"]) for row in table["rows"]] == [
        ("fp", "done"), ("baseline", "done"), ("ts", "done")]
    for row in table["rows"]:
        assert 0 <= row["top1"] <= row["top5"] <= 1
        assert "--eval_split=holdout" in row["command"]
    w2 = table["summary"]["clip"]["2"]
    assert w2["ts"]["vs_baseline"] == pytest.approx(w2["ts"]["top1"] - w2["baseline"]["top1"])
    md = (res / "table.md").read_text()
    assert "## FP activation clip, W2A2" in md and "| Baseline | 1 |" in md and "| TS | 2 |" in md
    for png in ("curves.png", "changes.png"):
        assert (res / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ts_results = res / "clip" / "seed0" / "w2" / "ts" / "results.json"
    stamp = ts_results.stat().st_mtime_ns

    again = script(*argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier") == 3 and "running:" not in again.stdout
    assert ts_results.stat().st_mtime_ns == stamp
    assert json.loads((res / "table.json").read_text())["summary"] == table["summary"]

    # --report_only: the table of the finished rows, pending ones marked, nothing run.
    printed = []
    argv = [a if not a.startswith("--rows=") else "--rows=fp,baseline,ts,pq" for a in argv]
    assert ab.main([a for a in argv if a != "--quiet"] + ["--report_only"],
                   out=printed.append) == 0
    rows = json.loads((res / "table.json").read_text())["rows"]
    assert [(row["key"], row["status"]) for row in rows] == [
        ("fp", "done"), ("baseline", "done"), ("ts", "done"), ("pq", "pending")]
    assert not (res / "clip" / "seed0" / "w2" / "pq").exists()
    assert "| PQ |" in (res / "table.md").read_text()


def test_the_same_script_on_cifar100_pickles(tmp_path):
    # The "same script on CIFAR-100 when given its data": the pickle layout of
    # cifar-100-python/; the trained rows must have the data's 100 classes, not ten.
    import keras

    import tfq  # noqa: F401  (registers the layers the saved model is made of)
    from test_data_helpers import cifar_batch, write_pickle

    folder = tmp_path / "data" / "cifar-100-python"
    for split, n, seed in (("train", 400, 1), ("test", 100, 2)):
        batch, _, labels = cifar_batch(n, 100, seed, label_key=b"fine_labels")
        batch[b"coarse_labels"] = [lab % 20 for lab in labels]
        write_pickle(str(folder / split), batch, protocol=3)
    write_pickle(str(folder / "meta"), {
        b"fine_label_names": [f"c{i:03d}".encode() for i in range(100)],
        b"coarse_label_names": [f"s{i:02d}".encode() for i in range(20)]})
    res = tmp_path / "res"
    r = script("--dataset=cifar100", f"--data_dir={tmp_path / 'data'}", "--bits=4",
               "--rows=fp,baseline", "--fp_epochs=1", "--budget=stage:1", "--train_limit=0",
               "--holdout=100", "--eval_limit=50", "--batch_size=32", f"--results_dir={res}",
               "--quiet", "--extra=--steps_per_epoch=2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = json.loads((res / "table.json").read_text())
    assert [(row["key"], row["status"]) for row in table["rows"]] == [
        ("fp", "done"), ("baseline", "done")]
    assert all("--dataset=cifar100" in row["command"] for row in table["rows"])
    base = res / "clip" / "seed0" / "w4" / "baseline"
    final = json.loads((base / "results.json").read_text())["final_model"]
    model = keras.models.load_model(base / final)
    assert model.output_shape[-1] == 100
    assert "## FP activation clip, W4A4" in (res / "table.md").read_text()


@pytest.mark.parametrize("test_split,label", [("test", False), ("holdout", True)])
def test_goals_name_the_split_the_table_reports(ab, tmp_path, test_split, label):
    # The table holds each row's final evaluation on --test_split, whatever split the
    # per-epoch curves use: only a holdout table is marked as one for tuning.
    args = args_for(ab, tmp_path, "--bits=2", "--rows=baseline,ts,pq,guided", "--holdout=50",
                    "--eval_split=holdout", f"--test_split={test_split}")
    rows = ab.plan_rows(args)
    statuses = [{"status": "done", "top1": 0.6, "top5": 0.9} for _ in rows]
    texts = [text for _, status, text in ab.goals(ab.summarize(rows, statuses, args), args)
             if status != "N/A"]
    assert texts
    assert all(("[holdout split, for tuning]" in t) == label for t in texts), texts
