"""The training CLI: end to end, bad flags, resume after kill -9, NaN, atomic writes."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from tfq import runstate
from tfq import train as tr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model=resnet20", "--dataset=digits", "--batch_size=32", "--steps_per_epoch=3",
        "--eval_limit=64", "--verbose=2", "--bits=4", "--lr=0.01"]


def cli(args, **kw):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "-1"}
    return subprocess.run([sys.executable, "-m", "tfq.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, **kw)


def test_cli_end_to_end(tmp_path):
    d = tmp_path / "run"
    r = cli(TINY + [f"--model_dir={d}", "--method=fp,baseline,ts+guided", "--pretrain_epochs=2",
                    "--epochs=1"])
    assert r.returncode == 0, r.stderr[-3000:]
    # The plan is printed before training, then a results table.
    assert r.stdout.index("stages:") < r.stdout.index("[00_fp] W32A32")
    table = r.stdout[r.stdout.index("method             top-1"):].splitlines()
    assert [row.split()[0] for row in table[1:4]] == ["fp", "baseline", "ts+guided"]
    assert "w4a32_guided" in r.stdout
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["methods"] == ["fp", "baseline", "ts+guided"] and cfg["w_bits"] == 4
    res = json.loads((d / "results.json").read_text())
    assert res["complete"] and [s["stage"] for s in res["stages"]] == [
        "00_fp", "baseline/01_w4a4", "ts+guided/01_w4a32_guided", "ts+guided/02_w4a4_guided"]
    for s in res["stages"]:
        assert {"name", "w_bits", "a_bits", "epochs", "top1", "top5", "loss", "wall_time_s", "model"} <= set(s)
        assert 0 <= s["top1"] <= s["top5"] <= 1 and s["wall_time_s"] > 0
    assert res["final_model"] == "stages/ts+guided/02_w4a4_guided/model.keras"
    assert set(res["methods"]) == {"fp", "baseline", "ts+guided"}
    rows = (d / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 + 1 + 2  # header + one row per epoch of every stage
    assert (d / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = [f for _, _, fs in os.walk(d / "tensorboard") for f in fs if "tfevents" in f]
    assert len(events) >= 4
    assert (d / "mean.npy").exists()
    import keras

    import tfq

    final = keras.models.load_model(d / res["final_model"])
    assert tfq.get_precision(final) == tfq.Precision(4, 4)
    assert not final.compiled  # stage models carry no optimizer state
    assert not list((d / "stages").rglob("ckpt/*"))  # checkpoints go once a stage is done

    # Rerunning the finished command trains nothing.
    again = cli(TINY + [f"--model_dir={d}", "--method=fp,baseline,ts+guided", "--pretrain_epochs=2",
                        "--epochs=1"])
    assert again.returncode == 0 and again.stdout.count("finished earlier") == 4
    # A different config in the same model_dir is refused.
    other = cli(TINY + [f"--model_dir={d}", "--method=pq", "--epochs=1"])
    assert other.returncode == 2 and "different config" in other.stderr


@pytest.fixture
def parse():
    def _parse(*argv):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["tfq.train", *argv])
        try:
            return tr.config_from_flags()
        finally:
            flags.FLAGS.unparse_flags()

    return _parse


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--model=vgg16"], "known models: alexnet"),
        (["--method=dorefa"], "accepted: fp, baseline"),
        (["--dataset=imagenet21k"], "known: "),
        (["--bits=3", "--w_bits=9"], None),  # --bits wins: valid
        (["--w_bits=9"], r"1\.\.8, or 32"),
        (["--a_bits=0"], r"1\.\.8, or 32"),
        (["--pq_sequence=32,4,8,2"], "strictly decrease"),
        (["--pq_sequence=32,x"], "integers"),
        (["--data_dir=/no/such/folder"], "does not exist"),
        (["--epochs=0"], "--epochs"),
        (["--batch_size=-4"], "--batch_size"),
        (["--lr=0"], "--lr"),
        (["--init_from=/no/such.keras"], "does not exist"),
        (["--method=ts", "--stage_epochs=1,2,3"], "2 quantized stages"),
        (["--method=fp,baseline"], "pretrain_epochs"),
        (["--eval_split=holdout"], "holdout"),
        (["--test_split=unused"], "needs --train_limit"),
        (["--eval_split=unused", "--train_limit=100", "--eval_limit=50"], "does not apply"),
        (["--data_option=novalue"], "key=value"),
        (["--data_option=pad=two"], "pad must be an integer; got 'two'"),
        (["--data_option=flip=maybe"], "flip must be true or false"),
        (["--bits=32", "--method=baseline"], "below 32"),
    ],
)
def test_bad_flags_rejected_before_any_work(parse, argv, match):
    if match is None:
        assert parse(*argv).w_bits == 3
        return
    with pytest.raises(tr.ConfigError, match=match):
        parse(*argv)


def test_data_options_from_the_command_line_are_typed(parse):
    cfg = parse("--data_option=pad=2", "--data_option=flip=No", "--data_option=resize=40",
                "--data_option=label_mode=coarse")
    assert cfg.data_options == (("pad", 2), ("flip", False), ("resize", 40),
                                ("label_mode", "coarse"))
    assert parse("--data_option=flip=TRUE").data_options == (("flip", True),)


def test_guidance_layers_checked_before_any_work(parse):
    # What --guidance_layers names must be layers of the model, for any guided method.
    for method in ("guided", "pq+ts+guided"):
        with pytest.raises(tr.ConfigError, match=r"\['typo'\] are not layers of resnet20; "
                           r"its guidance points are stage2_block3_out, stage3_block3_out, "
                           r"its logits 'scalar'; every layer: .*stem_act"):
            parse("--model=resnet20", f"--method={method}", "--guidance_layers=fc,typo")
    assert parse("--model=resnet20", "--method=guided",
                 "--guidance_layers=scalar").guidance_layers == ("scalar",)
    # ** keeps the layer names.
    assert parse("--model=resnet20", "--method=guided", "--fp_first_last",
                 "--guidance_layers=fc,stage1_block1_out").guidance_layers == (
                     "fc", "stage1_block1_out")
    # Unused without a guided stage, so not checked (no model is built).
    assert parse("--method=baseline", "--guidance_layers=typo").guidance_layers == ("typo",)
    # The ablation script validates every finished guided row: the model is built once.
    tr._layer_names.cache_clear()
    for _ in range(3):
        parse("--model=resnet20", "--method=guided", "--guidance_layers=scalar")
    assert tr._layer_names.cache_info().misses == 1


def test_bad_flag_exits_with_message(tmp_path):
    r = cli(["--model=vgg16", f"--model_dir={tmp_path / 'x'}"])
    assert r.returncode == 2 and "unknown model 'vgg16'" in r.stderr
    assert not (tmp_path / "x").exists()  # nothing was written


def wait_for(path, pred, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            state = json.loads(path.read_text())
            if pred(state):
                return state
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.parametrize("source", ["digits", "tfrecord"])
def test_resume_after_kill(tmp_path, source):
    d = tmp_path / "run"
    # Whole passes over 96 images (3 batches), deterministic ops and pipeline: the
    # resumed run must end with the very weights of an uninterrupted one.
    args = [a for a in TINY if not a.startswith("--steps_per_epoch")] + [
        "--deterministic", "--method=ts", "--pretrain_epochs=1", "--epochs=3"]
    if source == "digits":
        args.append("--train_limit=96")
    else:  # ImageNet-layout shards: shard order, shuffle buffer and crops are per pass
        from test_data_helpers import WNIDS, imagenet_shards, write

        shards = tmp_path / "shards"
        imagenet_shards(str(shards), "train", 4, 24)
        imagenet_shards(str(shards), "validation", 1, 12, seed=7)
        write(str(shards / "synsets.txt"), "\n".join(WNIDS).encode())
        args = [a for a in args if a != "--dataset=digits"] + [
            "--dataset=imagenet", f"--data_dir={shards}", "--image_size=32",
            "--data_option=shuffle_buffer=16"]
    whole = cli(args + [f"--model_dir={tmp_path / 'whole'}"])
    assert whole.returncode == 0, whole.stderr[-3000:]
    args = args + [f"--model_dir={d}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "-1"}
    proc = subprocess.Popen([sys.executable, "-m", "tfq.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    key = "ts/02_w4a4"
    wait_for(d / "state.json",
             lambda s: s["stages"].get(key, {}).get("epochs_done", 0) >= 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((d / "state.json").read_text())
    done_mtime = os.path.getmtime(d / state["stages"]["ts/01_w4a32"]["model"])
    resumed_from = state["stages"][key]["epochs_done"]
    assert resumed_from in (1, 2)

    r = cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("finished earlier") == 2  # 00_fp and ts/01 are not rerun
    assert f"[{key}] resuming after epoch {resumed_from}/3" in r.stdout
    assert os.path.getmtime(d / state["stages"]["ts/01_w4a32"]["model"]) == done_mtime
    res = json.loads((d / "results.json").read_text())
    assert res["complete"] and [s["stage"] for s in res["stages"]] == ["00_fp", "ts/01_w4a32", key]
    epochs = [int(line.split(",")[2]) for line in (d / "log.csv").read_text().splitlines()[1:]]
    assert epochs == [1, 1, 2, 3, 1, 2, 3]  # every epoch logged exactly once

    # Each process that trained is on record, with where it started; every epoch
    # names the process that ran it.
    import platform

    import keras

    state = json.loads((d / "state.json").read_text())
    first, second = state["processes"]
    assert first["from"] == {"stage": "00_fp", "epoch": 0}
    assert second["from"] == {"stage": key, "epoch": resumed_from}
    assert first["pid"] == proc.pid and second["pid"] not in (proc.pid, os.getpid())
    for p in (first, second):
        assert p["host"] == platform.node() and p["cores"] == os.cpu_count() and p["cpu"]
        assert (p["tensorflow"], p["keras"]) == (tf.__version__, keras.__version__)
        assert p["started"].endswith("+00:00")
    assert first["started"] <= second["started"]
    ran_by = {k: [h["process"] for h in st["history"]] for k, st in state["stages"].items()}
    assert ran_by == {"00_fp": [0], "ts/01_w4a32": [0, 0, 0],
                      key: [0] * resumed_from + [1] * (3 - resumed_from)}
    # ... and which pass over the data it saw: the run's epoch, counted across stages.
    passes = [h["data_pass"] for k in ("00_fp", "ts/01_w4a32", key)
              for h in state["stages"][k]["history"]]
    assert passes == list(range(7))

    # The same result as without the kill: every pass (order, crops, flips) belongs to
    # its epoch of the run, not to how many passes this process has made.
    final = keras.models.load_model(d / res["final_model"])
    reference = keras.models.load_model(tmp_path / "whole" / res["final_model"])
    for w, r in zip(final.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(w.numpy(), r.numpy(), err_msg=w.path)


def test_nan_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from tfq import distribute

    x = np.random.default_rng(0).uniform(-1, 1, (96, 8, 8, 3)).astype("float32")
    y = np.arange(96) % 10
    good = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    bad = tf.data.Dataset.from_tensor_slices((np.full_like(x, np.nan), y)).batch(32)

    def fake_dataset(strategy, name, split, batch, training=False, **kw):
        # Epoch 1 (3 steps) sees good batches, epoch 2 NaN images.
        return good.concatenate(bad.repeat()) if training else good

    monkeypatch.setattr(distribute, "dataset", fake_dataset)
    cfg = tr.validate(tr.TrainConfig(model="resnet20", dataset="digits", methods=("baseline",),
                                     epochs=3, steps_per_epoch=3, batch_size=32, mean="none",
                                     model_dir=str(tmp_path / "run"), verbose="0"))
    with pytest.raises(tr.TrainingDiverged, match=r"loss became nan at epoch 2.*epoch 1\) is kept"):
        tr.train(cfg, out=lambda *a: None)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    st = state["stages"]["baseline/01_w4a4"]
    assert st["epochs_done"] == 1 and st["status"] == "running"
    ckpt = tmp_path / "run" / st["checkpoint"]
    import tfq

    m = tfq.models.build("resnet20", num_classes=10, input_shape=(8, 8, 3))
    m.load_weights(ckpt)  # loadable, finite
    assert all(np.isfinite(w).all() for w in m.get_weights())


def test_a_training_pipeline_of_unknown_length_trains_like_a_known_one(tmp_path, monkeypatch):
    """Keras calls the train step once more after a pass of unknown length (skipped
    corrupt images, a limited or sharded stream); that call must change nothing: same
    weights, same logged training metrics as the same batches with a known length."""
    import keras

    from tfq import distribute, steps

    x = np.random.default_rng(0).uniform(-1, 1, (96, 8, 8, 3)).astype("float32")
    y = np.arange(96) % 10
    known = tf.data.Dataset.from_tensor_slices((x, y)).batch(32, drop_remainder=True)
    unknown = known.unbatch().filter(lambda a, b: True).batch(32, drop_remainder=True)
    runs, guarded, guard = {}, {"known": [], "unknown": []}, steps.guard_train_step
    for name, train_ds in (("known", known), ("unknown", unknown)):
        monkeypatch.setattr(distribute, "dataset", lambda strategy, dataset, split, batch,
                            training=False, _ds=train_ds, **kw: _ds if training else known)
        monkeypatch.setattr(steps, "guard_train_step", lambda model, _name=name: (
            guarded[_name].append(type(model).__name__) or guard(model)))
        cfg = tr.validate(tr.TrainConfig(
            model="resnet20", dataset="digits", methods=("fp", "guided"), pretrain_epochs=1,
            epochs=2, lr=0.05, pretrain_lr=0.05, weight_decay=0.05, batch_size=32,
            mean="none", seed=1, model_dir=str(tmp_path / name), verbose="0"))
        keras.utils.set_random_seed(1)
        tr.train(cfg, out=lambda *a: None)
        runs[name] = tmp_path / name
    # The wait costs graph-building time, so only the unknown length gets it.
    assert guarded == {"known": [], "unknown": ["Functional", "GuidedModel"]}
    logs = {k: (d / "log.csv").read_text().splitlines() for k, d in runs.items()}
    header = logs["known"][0].split(",")
    for row_known, row_unknown in zip(logs["known"][1:], logs["unknown"][1:], strict=True):
        for col, a, b in zip(header, row_known.split(","), row_unknown.split(",")):
            if col in ("accuracy", "loss", "top5", "fp_accuracy", "val_accuracy") and a:
                np.testing.assert_allclose(float(b), float(a), rtol=1e-5, err_msg=col)
    final = json.loads((runs["known"] / "results.json").read_text())["final_model"]
    a, b = (keras.models.load_model(runs[k] / final) for k in ("known", "unknown"))
    for wa, wb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_allclose(wb.numpy(), wa.numpy(), rtol=1e-4, atol=1e-6, err_msg=wa.path)


def test_atomic_write_survives_a_crash_mid_write(tmp_path):
    target = tmp_path / "state.json"
    runstate.write_json(target, {"epoch": 1})
    with pytest.raises(RuntimeError):
        with runstate.atomic_path(target, ".json") as tmp:
            with open(tmp, "w") as f:
                f.write('{"epoch": 2, "trunc')
            raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]

    # A real kill -9 in the middle of a write leaves the old file intact.
    code = (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from tfq import runstate\n"
        "with runstate.atomic_path(%r, '.json') as tmp:\n"
        "    f = open(tmp, 'w'); f.write('{\"epoch\": 3, '); f.flush(); print('writing', flush=True); time.sleep(60)\n"
    ) % (ROOT, str(target))
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.kill()
    p.wait()
    assert json.loads(target.read_text()) == {"epoch": 1}


def test_run_lock_refuses_a_second_process(tmp_path):
    with runstate.RunLock(tmp_path):
        with pytest.raises(runstate.RunBusy, match="in use"):
            with runstate.RunLock(tmp_path):
                pass
    with runstate.RunLock(tmp_path):  # released
        pass


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "flags")) if f.endswith(".cfg")))
def test_every_flagfile_resolves_to_a_valid_config(parse, name, tmp_path):
    cfg = parse(f"--flagfile={os.path.join(ROOT, 'flags', name)}", f"--data_dir={tmp_path}")
    if name == "demo.cfg":
        assert cfg.dataset == "digits" and cfg.methods == ("fp", "baseline", "pq+ts+guided")
        assert (cfg.w_bits, cfg.a_bits) == (4, 4)
    else:
        assert cfg.methods == ("pq+ts+guided",) and cfg.w_bits == int(name.split("_")[-1][0])
        assert cfg.model in ("alexnet", "alexnet_cifar", "resnet50")


def test_init_from_rebuilds_with_this_runs_options_and_test_split(tmp_path):
    import keras

    import tfq

    fp_dir = tmp_path / "fp"
    r = cli(TINY + [f"--model_dir={fp_dir}", "--method=fp", "--epochs=1"])
    assert r.returncode == 0, r.stderr[-3000:]
    d = tmp_path / "star"
    r = cli(TINY + [f"--model_dir={d}", f"--init_from={fp_dir}", "--method=baseline", "--bits=2",
                    "--epochs=1", "--fp_first_last", "--holdout=100", "--eval_split=holdout",
                    "--test_split=test"])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((d / "results.json").read_text())
    stage = res["stages"][0]
    assert {"test_top1", "test_top5", "test_loss"} <= set(stage) and "test top-1" in r.stdout
    final = keras.models.load_model(d / res["final_model"])
    # The ** variant's first conv and last FC stay at 32 bits even though the
    # --init_from model was saved without pinned layers.
    assert final.get_layer("stem").w_bits == 32 and final.get_layer("stem").pinned
    assert final.get_layer("fc").w_bits == 32 and final.get_layer("stage1_block1_1").w_bits == 2
    assert tfq.get_precision(final) == tfq.Precision(2, 2)


def test_unused_split_and_evaluate_run_use_the_images_training_never_saw(tmp_path):
    import keras

    import tfq.data

    d = tmp_path / "run"
    r = cli(TINY + [f"--model_dir={d}", "--method=fp", "--epochs=1", "--train_limit=200",
                    "--holdout=100", "--eval_split=holdout", "--test_split=unused", "--seed=3"])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((d / "results.json").read_text())
    model = keras.models.load_model(d / res["final_model"])
    x, y = [], []
    for images, labels in tfq.data.build_dataset("digits", "unused", limit=200, holdout=100, seed=3,
                                                 mean=np.load(d / "mean.npy"), batch_size=512):
        x.append(images.numpy())
        y.append(labels.numpy())
    y = np.concatenate(y)
    top1 = np.mean(np.argmax(model.predict(np.concatenate(x), verbose=0), -1) == y)
    assert len(y) == 1438 - 300
    assert res["methods"]["fp"]["test_top1"] == pytest.approx(top1, abs=1e-6)
    # evaluate_run rebuilds the run's own pipeline (seed, subsets, mean) afterwards
    assert tr.evaluate_run(str(d), "unused")["top1"] == pytest.approx(top1, abs=1e-6)
    assert tr.evaluate_run(str(d), "holdout")["top1"] == pytest.approx(
        res["methods"]["fp"]["top1"], abs=1e-6)
    os.remove(d / res["final_model"])
    with pytest.raises(tr.ConfigError, match="final model is not there"):
        tr.evaluate_run(str(d), "unused")
    with pytest.raises(tr.ConfigError, match="not a tfq training run"):
        tr.evaluate_run(str(tmp_path), "test")


def test_resume_accepts_a_config_written_before_a_flag_existed(tmp_path):
    cfg = tr.validate(tr.TrainConfig(model_dir=str(tmp_path)))
    old = cfg.to_dict()
    del old["calibrate_range"]  # a run started by an older tfq
    runstate.write_json(tmp_path / "config.json", old)
    tr._Run(cfg).check_config()  # same behaviour: accepted
    changed = tr.validate(tr.TrainConfig(model_dir=str(tmp_path), calibrate_range=False))
    with pytest.raises(tr.ConfigError, match="calibrate_range"):
        tr._Run(changed).check_config()
