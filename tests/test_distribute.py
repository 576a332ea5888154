"""tf.distribute: 2 mirrored CPU replicas equal 1 device; a 2-worker cluster survives a kill."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "-1", "PYTHONPATH": ROOT}


def mirrored(kind, bn):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "mirrored_equivalence.py"),
                        kind, bn], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["plain", "guided"])
def test_two_mirrored_replicas_equal_one_device_with_synchronised_batchnorm(kind):
    out = mirrored(kind, "sync")
    assert out["replicas"] == 2
    # Same weights as one device after 3 steps on fixed batches, up to float error.
    assert out["trainable_diff"] < 1e-4 * max(1.0, out["trainable_scale"])
    assert out["stats_diff"] < 1e-4
    assert out["replica_copies_diff"] == 0.0


def test_per_replica_batchnorm_statistics_are_averaged_across_replicas():
    out = mirrored("plain", "local")
    # Each replica normalises with its own half batch, so training differs from one
    # device; the moving statistics are averaged after every epoch, so the replicas
    # (and any checkpoint) agree.
    assert out["trainable_diff"] > 1e-4
    assert out["replica_copies_diff"] == 0.0


def test_tpu_without_a_tpu_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tfq.train", "--distribution=tpu", "--epochs=1",
                        f"--model_dir={tmp_path / 'r'}"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--distribution=tpu" in r.stderr and "Traceback" not in r.stderr


def test_multi_worker_without_tf_config_is_a_clear_error(tmp_path):
    env = {k: v for k, v in ENV.items() if k != "TF_CONFIG"}
    r = subprocess.run([sys.executable, "-m", "tfq.train", "--distribution=multi_worker",
                        f"--model_dir={tmp_path / 'r'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "TF_CONFIG" in r.stderr and "tfq.launch" in r.stderr


def test_two_workers_survive_a_killed_worker_and_agree(tmp_path):
    import numpy as np

    d = tmp_path / "run"
    args = ["--model=resnet20", "--dataset=digits", "--batch_size=32", "--steps_per_epoch=3",
            "--eval_limit=64", "--verbose=2", "--bits=4", "--method=baseline",
            "--pretrain_epochs=1", "--epochs=3", f"--model_dir={d}"]
    proc = subprocess.Popen([sys.executable, "-m", "tfq.launch", "--num_workers=2",
                             "--max_restarts=2", "--", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, pids, killed = [], {}, False
    deadline = time.time() + 900
    for line in proc.stdout:
        lines.append(line)
        m = re.match(r"\[launch\] worker (\d) pid (\d+)", line)
        if m:
            pids[int(m.group(1))] = int(m.group(2))
        state = d / "state.json"
        if not killed and state.exists():
            try:
                st = json.loads(state.read_text())["stages"].get("baseline/01_w4a4", {})
            except json.JSONDecodeError:
                st = {}
            if st.get("epochs_done", 0) >= 1:
                os.kill(pids[1], signal.SIGKILL)  # the non-chief worker, mid-stage
                killed = True
        assert time.time() < deadline, "".join(lines[-50:])
    proc.wait(timeout=60)
    out = "".join(lines)
    assert killed, out[-3000:]
    assert proc.returncode == 0, out[-5000:]
    assert "worker 1 exited with -9" in out and "all workers finished" in out
    assert "[baseline/01_w4a4] resuming after epoch" in out
    res = json.loads((d / "results.json").read_text())
    assert res["complete"] and [s["stage"] for s in res["stages"]] == ["00_fp", "baseline/01_w4a4"]

    import keras

    import tfq  # noqa: F401  (registers the tfq layers for loading)

    chief = keras.models.load_model(d / res["final_model"])
    worker = keras.models.load_model(d / "workers" / "worker_1" / res["final_model"])
    for a, b in zip(chief.weights, worker.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
