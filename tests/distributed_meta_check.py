"""Distributed checks of the MID train_step, run in fresh processes (device setup must precede TF init).

  python tests/distributed_meta_check.py mirrored
      2 logical CPUs: one MirroredStrategy step on a global batch of 16 (8 per replica) equals one
      single-device step on the same 16 examples. Prints MIRRORED_OK.
  python tests/distributed_meta_check.py multi_worker
      launches 2 local workers (TF_CONFIG on 127.0.0.1) running MultiWorkerMirroredStrategy for a few
      MID steps; their final student weights must be identical. Prints MULTI_WORKER_OK.
The pool is deterministic per example (no random starts), so sharding cannot change the attacks.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

POOL = "clean,fgsm,bim40:nb_iter=3,eps_iter=0.1,mim40_t0:nb_iter=3,eps_iter=0.1"


def _build(seed=0):
    import keras
    from mid_tf.attacks.pool import AttackPool
    from mid_tf.config import MIDStageConfig
    from mid_tf.models import build_models
    from mid_tf.training.meta import MetaInvarianceDefense

    keras.utils.set_random_seed(seed)
    m = build_models("mnist", width=0.25)
    mid = MetaInvarianceDefense(student_encoder=m.student_encoder, teacher_encoder=m.teacher_encoder,
                                decoder=m.decoder, classifier=m.classifier, target=m.target,
                                pool=AttackPool(POOL, seed=seed), config=MIDStageConfig(alpha=1e-2))
    mid.compile(optimizer=keras.optimizers.Adam(1e-3))
    mid.optimizer.build(m.student_encoder.trainable_variables)
    return mid, m


def _data(n=16):
    import numpy as np
    rng = np.random.default_rng(0)
    return rng.random((n, 28, 28, 1), dtype=np.float32), (np.arange(n) % 10).astype(np.int64)


def mirrored():
    import numpy as np
    import tensorflow as tf
    from mid_tf.training.distribute import configure_logical_cpus, make_strategy

    configure_logical_cpus(2)
    x, y = _data(16)
    mid, m = _build()
    init = [w.copy() for w in m.student_encoder.get_weights()]
    frozen = {n: [w.copy() for w in getattr(m, n).get_weights()] for n in ("teacher_encoder", "decoder", "classifier", "target")}
    mid.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    single = m.student_encoder.get_weights()

    strategy = make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
    with strategy.scope():
        mid2, m2 = _build()
        m2.student_encoder.set_weights(init)
        for n, ws in frozen.items():
            getattr(m2, n).set_weights(ws)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    mid2.fit(ds, epochs=1, verbose=0)
    mirrored_w = m2.student_encoder.get_weights()
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(single, init))
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(single, mirrored_w))
    print(f"moved={moved:.3e} max|single-mirrored|={diff:.3e}")
    assert moved > 1e-4, "the step did not move the student"
    assert diff <= 1e-5, diff
    print("MIRRORED_OK")


def worker(index, ports, out):
    import numpy as np
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                          "task": {"type": "worker", "index": index}})
    from mid_tf.training.distribute import make_strategy
    strategy = make_strategy("multi_worker")
    import keras
    keras.config.disable_traceback_filtering()
    x, y = _data(48)
    with strategy.scope():
        mid, m = _build()
    init = m.student_encoder.get_weights()
    mid.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    final = m.student_encoder.get_weights()
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(final, init))
    np.savez(out, moved=moved, *final)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multi_worker():
    import numpy as np
    ports = [_free_port(), _free_port()]
    tmp = tempfile.mkdtemp()
    outs = [os.path.join(tmp, f"w{i}.npz") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, __file__, "worker", str(i), ",".join(map(str, ports)), outs[i]])
             for i in range(2)]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], codes
    a, b = np.load(outs[0]), np.load(outs[1])
    keys = [k for k in a.files if k.startswith("arr_")]
    diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in keys)
    print(f"moved={float(a['moved']):.3e} max|worker0-worker1|={diff:.3e}")
    assert float(a["moved"]) > 1e-4
    assert diff == 0.0, diff
    print("MULTI_WORKER_OK")


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "mirrored":
        mirrored()
    elif mode == "multi_worker":
        multi_worker()
    elif mode == "worker":
        worker(int(sys.argv[2]), [int(p) for p in sys.argv[3].split(",")], sys.argv[4])
    else:
        raise SystemExit(f"unknown mode {mode}")
