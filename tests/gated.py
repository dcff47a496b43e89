"""train.py with a gate at one step, for the tests that stop a run from outside (a kill, a
preemption, a lost rank) at a step they choose, whatever the machine's load.

    python tests/gated.py GATE STEP MODE train.py-arguments...
    torchrun --nproc_per_node=2 tests/gated.py GATE STEP MODE train.py-arguments...

Before step STEP (STEP − 1 steps done), every rank waits for the checkpoint write in flight
(so ``last.pt`` on disk is the newest one saved, as the next save would make it), writes
GATE/reached.RANK and then, by MODE:

* ``wait``:   blocks until the file GATE/open exists (a test kills it there);
* ``signal``: blocks until this process has received a preemption signal (SIGTERM, SIGUSR1),
              then takes the step, after which the ranks agree to stop;
* ``die``:    the last rank exits at once (status 3, no word), as a failed worker would;
* ``hang``:   the last rank blocks until GATE/open exists, outside any collective, as a stuck
              worker would; the other ranks go on into the step's collectives.

A run that starts from a checkpoint (a restart after ``die``) has no gate. A gate left shut
for GATE_LIMIT seconds exits with status 4, so that a failed test leaves no process behind.
train.py is wrapped from outside (train.train_step, train.train); nothing in it knows the gate.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402

GATE_LIMIT = 600                                # seconds: the longest a gate stays shut


def wait_until(condition):
    deadline = time.time() + GATE_LIMIT
    while not condition():
        if time.time() > deadline:
            print(f"gated.py: the gate stayed shut for {GATE_LIMIT} s", file=sys.stderr,
                  flush=True)
            os._exit(4)
        time.sleep(0.01)


def install(gate, step, mode):
    """Wrap train.train (to see the run's saves and signals) and train.train_step (the gate)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    last_rank = rank == world - 1
    seen = {}
    train_loop, train_step = train.train, train.train_step

    def watched_train(run, state, last_good, signals):
        seen.update(last_good=last_good, signals=signals)
        return train_loop(run, state, last_good, signals)

    def gated_step(run, state, batch):
        if state.step + 1 == step:
            train.settle(run, state, seen["last_good"])          # every rank: a collective
            with open(os.path.join(gate, f"reached.{rank}"), "w") as f:
                f.write(f"{state.step}\n")
            shut = lambda: not os.path.exists(os.path.join(gate, "open"))   # noqa: E731
            if mode == "wait" or (mode == "hang" and last_rank):
                wait_until(lambda: not shut())
            elif mode == "signal":
                wait_until(lambda: seen["signals"].received)
            elif mode == "die" and last_rank:
                os._exit(3)
        return train_step(run, state, batch)

    train.train, train.train_step = watched_train, gated_step


def main(argv):
    gate, step, mode, args = argv[0], int(argv[1]), argv[2], argv[3:]
    if mode not in ("wait", "signal", "die", "hang"):
        raise SystemExit(f"gated.py: mode {mode!r}; allowed: wait, signal, die, hang")
    out = args[args.index("--out") + 1]
    if not os.path.exists(os.path.join(out, "last.pt")):         # a fresh start, not a restart
        os.makedirs(gate, exist_ok=True)
        install(gate, step, mode)
    train.main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
