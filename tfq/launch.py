"""Start a multi-worker training cluster on this machine, restarting it on failure.

``python -m tfq.launch --num_workers=2 -- --flagfile=flags/demo.cfg --model_dir=runs/x``

Each worker is ``python -m tfq.train <flags> --distribution=multi_worker`` with its
own ``TF_CONFIG`` (127.0.0.1, free ports). ``MultiWorkerMirroredStrategy`` trains in
lockstep, so when any worker dies the others cannot go on: the launcher stops the
rest and restarts every worker, and the run resumes from the last completed epoch
(``state.json``), up to ``--max_restarts`` times. On several machines, set TF_CONFIG
on each and run ``python -m tfq.train --distribution=multi_worker`` there instead
(see the README).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

flags.DEFINE_integer("num_workers", 2, "Worker processes to start.")
flags.DEFINE_integer("max_restarts", 3, "Restarts of the whole cluster after a worker fails.")
flags.DEFINE_string("host", "127.0.0.1", "Address the workers listen on.")
FLAGS = flags.FLAGS


def free_ports(n, host="127.0.0.1"):
    """``n`` distinct free TCP ports on ``host``."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind((host, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def tf_config(workers, index):
    """The TF_CONFIG of worker ``index`` in a cluster of ``workers`` addresses."""
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def _pump(proc, prefix):
    for line in proc.stdout:
        sys.stdout.write(f"{prefix} {line}")
        sys.stdout.flush()


def start_cluster(train_args, num_workers, host="127.0.0.1"):
    """Starts the workers; returns their Popen objects (outputs prefixed, streamed)."""
    workers = [f"{host}:{p}" for p in free_ports(num_workers, host)]
    procs = []
    for i in range(num_workers):
        env = {**os.environ, "TF_CONFIG": tf_config(workers, i)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "tfq.train", *train_args, "--distribution=multi_worker"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        print(f"[launch] worker {i} pid {proc.pid} at {workers[i]}", flush=True)
        threading.Thread(target=_pump, args=(proc, f"[worker {i}]"), daemon=True).start()
        procs.append(proc)
    return procs


def supervise(train_args, num_workers, max_restarts, host="127.0.0.1", poll=0.2):
    """Runs the cluster until every worker succeeds; restarts all after a failure.

    Returns:
      0 on success, 1 when the restarts are used up.
    """
    for attempt in range(max_restarts + 1):
        procs = start_cluster(train_args, num_workers, host)
        failed = None
        while failed is None and any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                if p.poll() not in (None, 0):
                    failed = (i, p.returncode)
            time.sleep(poll)
        if failed is None and all(p.returncode == 0 for p in procs):
            print("[launch] all workers finished", flush=True)
            return 0
        i, code = failed if failed else (None, None)
        print(f"[launch] worker {i} exited with {code}; stopping the others "
              f"(attempt {attempt + 1}/{max_restarts + 1})", flush=True)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    print("[launch] giving up: restarts used up", flush=True)
    return 1


def main(argv):
    if FLAGS.num_workers < 1:
        raise app.UsageError("--num_workers must be >= 1")
    sys.exit(supervise(argv[1:], FLAGS.num_workers, FLAGS.max_restarts, FLAGS.host))


if __name__ == "__main__":
    app.run(main)
