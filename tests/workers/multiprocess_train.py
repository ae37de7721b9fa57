"""One of several processes joined by jax.distributed on localhost (tests/test_multiprocess.py).

argv: coordinator_address num_processes process_id data_dir workdir
Prints "PARAMS <sha256 of this process's replica of the parameters after two steps>", then
"TRAINED" after a whole run, then "PREEMPTED <step>" after a run in which only process 1 gets
SIGTERM (before its third step).
"""

import hashlib
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def tiny_config(data_dir: str):
    from configs import tiny

    config = tiny.get_config()
    config.data_dir = data_dir
    config.max_steps = 2
    return config


def main():
    address, num_processes, process_id, data_dir, workdir = sys.argv[1:6]
    from sslocal import sharding

    sharding.initialize_distributed(address, int(num_processes), int(process_id))
    import jax
    import numpy as np

    from sslocal import train
    from sslocal.data import pipeline
    from sslocal.data import prepare as data_prepare

    config = tiny_config(data_dir)
    mesh = sharding.make_mesh()
    assert mesh.size == jax.device_count() > jax.local_device_count()
    source = data_prepare.load_split(config.train_dataset, "train", data_dir)
    loader = pipeline.train_loader(source, global_batch_size=config.batch_size,
                                   image_size=config.image_size, seed=0)
    tx = train.make_optimizer(config)
    graphdef, state = train.create_train_state(config, mesh, tx)
    step = train.make_train_step(graphdef, tx, train.loss_from_config(config), mesh)
    for _ in range(2):
        state, metrics = step(state, sharding.to_global(next(loader), mesh))
        assert bool(metrics["finite"])
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state.params):
        digest.update(np.asarray(leaf.addressable_data(0)).tobytes())
    print("PARAMS", digest.hexdigest(), flush=True)

    # The whole training loop too: per-host loading, global batch, collective checkpointing.
    train.train_and_evaluate(config, workdir)
    print("TRAINED", flush=True)

    # Preemption that reaches one host only: every host must still stop after the same step
    # and save it together (a host saving alone would wait for the others forever).
    make_train_step = train.make_train_step

    def make_step_that_preempts_process_1(*args, **kwargs):
        step_fn = make_train_step(*args, **kwargs)

        def step_fn_with_sigterm(state, batch):
            if jax.process_index() == 1 and int(state.step) + 1 == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return step_fn(state, batch)

        return step_fn_with_sigterm

    train.make_train_step = make_step_that_preempts_process_1
    config.max_steps = 8
    results = train.train_and_evaluate(config, workdir + "_preempted")
    print("PREEMPTED", results.get("preempted_at_step"), flush=True)


if __name__ == "__main__":
    main()
