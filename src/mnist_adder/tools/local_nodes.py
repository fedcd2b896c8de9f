"""Try a multi-node training on one machine: N torchrun "nodes" on the loopback address.

`python scripts/local_nodes.py N [train overrides...]` starts, for R = 0..N-1,

    torchrun --nnodes=N --node_rank=R --nproc_per_node=1 --master_addr=127.0.0.1 --master_port=P \
        scripts/train.py trainer=ddp_cpu trainer.devices=1 trainer.num_nodes=N hydra.run.dir=<one folder> ...

the command each machine of a cluster would run (docs/multinode.md), with a free port P and one run
folder for all nodes, as a cluster gives them a shared folder. It prints every node's output with a
`[node R]` prefix, waits for all of them, and fails when one fails: the others are given `grace_s` to
end on their own (a node that loses a peer stops by itself, with its own message) and then stopped.
"""

import argparse
import datetime
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from mnist_adder.errors import UserError

# The checkout that holds scripts/train.py and conf/ (scripts/local_nodes.py sets PROJECT_ROOT, as every
# entry script does).
ROOT = Path(os.environ.get("PROJECT_ROOT", Path(__file__).resolve().parents[3]))
LOOPBACK = "127.0.0.1"
# The trainer each node runs unless the overrides choose another: one CPU process per node, gloo.
DEFAULT_TRAINER = ("trainer=ddp_cpu", "trainer.devices=1")
# How long the other nodes may take to end on their own after one failed, before they are stopped.
GRACE_S = 60.0
# After SIGTERM, torchrun gives its processes 30 s before it kills them; then it is killed itself.
STOP_S = 45.0


def free_port() -> int:
    """A TCP port free on the loopback address now (the OS picks it; another program could take it before
    node 0 binds it, which then fails with 'address already in use': run again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _given(overrides: Sequence[str], key: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides)


def train_overrides(nodes: int, overrides: Sequence[str], run_dir: str) -> list[str]:
    """The overrides every node's scripts/train.py gets: the default trainer where none is chosen, the
    number of nodes, and one run folder for all (Hydra would give each process a folder of its own)."""
    if _given(overrides, "trainer.num_nodes"):
        raise UserError(
            "trainer.num_nodes is the number of nodes, the first argument of scripts/local_nodes.py: "
            "leave it out of the overrides."
        )
    defaults = [d for d in DEFAULT_TRAINER if not _given(overrides, d.split("=", 1)[0])]
    run_folder = [] if _given(overrides, "hydra.run.dir") else [f"hydra.run.dir={run_dir}"]
    return [*defaults, *overrides, f"trainer.num_nodes={nodes}", *run_folder]


def node_command(nodes: int, node_rank: int, port: int, overrides: Sequence[str]) -> list[str]:
    """The torchrun command of one node (torchrun run as `python -m torch.distributed.run`, so it is the
    torch of this interpreter): one process on this node, node 0 on the loopback address at `port`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nodes}",
        f"--node_rank={node_rank}",
        "--nproc_per_node=1",
        f"--master_addr={LOOPBACK}",
        f"--master_port={port}",
        str(ROOT / "scripts" / "train.py"),
        *overrides,
    ]


def default_run_dir() -> str:
    # The default run folder's pattern (conf/hydra/default.yaml), resolved by Hydra in each node to the
    # same folder: the time is fixed here, once for all nodes.
    now = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    return "${paths.log_dir}/${task_name}/runs/" + now


def _relay(stream: IO[str], prefix: str) -> None:
    for line in stream:
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def _stop(procs: list[subprocess.Popen], wait_s: float = 0.0) -> None:
    """Stop every node still running after `wait_s`: SIGTERM (torchrun passes it on to its process, and
    kills that after 30 s), then SIGKILL after STOP_S."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_S
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_local_nodes(nodes: int, overrides: Sequence[str], grace_s: float = GRACE_S) -> None:
    """Start `nodes` torchrun nodes on the loopback address, wait for all; a UserError naming the first
    node that failed (the others are stopped once `grace_s` has passed)."""
    if nodes < 1:
        raise UserError(f"the number of nodes must be at least 1, not {nodes}.")
    port = free_port()
    args = train_overrides(nodes, overrides, default_run_dir())
    print(f"[local_nodes] {nodes} nodes on {LOOPBACK}:{port}, each: scripts/train.py {' '.join(args)}")
    procs: list[subprocess.Popen] = []
    relays: list[threading.Thread] = []
    try:
        for rank in range(nodes):
            proc = subprocess.Popen(
                node_command(nodes, rank, port, args),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=os.environ | {"PYTHONUNBUFFERED": "1"},
            )
            print(f"[local_nodes] node {rank}: torchrun pid {proc.pid}", flush=True)
            procs.append(proc)
            relays.append(threading.Thread(target=_relay, args=(proc.stdout, f"[node {rank}] "), daemon=True))
            relays[-1].start()
        failed = wait_for_nodes(procs, grace_s)
    except KeyboardInterrupt:
        # Ctrl-C reached the nodes too (they share this terminal): torchrun passes it to the training
        # processes, which save last.ckpt (callbacks.InterruptCheckpoint). Give them the time to.
        print("[local_nodes] interrupted: waiting for the nodes to save and stop", file=sys.stderr)
        _stop(procs, wait_s=STOP_S)
        raise SystemExit(130) from None
    finally:
        for relay in relays:
            relay.join(timeout=5)
    if failed is not None:
        rank, status = failed
        how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
        raise UserError(
            f"node {rank} of {nodes} failed first ({how}); every node has ended. Why: the `error:` lines "
            "above, marked with their node ([node R]); a node that lost a peer says so in its own."
        )


def _first_failure(procs: list[subprocess.Popen]) -> tuple[int, int] | None:
    return next(((i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)), None)


def wait_for_nodes(procs: list[subprocess.Popen], grace_s: float) -> tuple[int, int] | None:
    """Wait until every node has ended; the (rank, status) of the first that failed, or None."""
    failed: tuple[int, int] | None = None
    stop_at = float("inf")
    while None in [p.poll() for p in procs]:  # every node polled: a failed one has its returncode set
        if failed is None and (failed := _first_failure(procs)) is not None:
            stop_at = time.monotonic() + grace_s
        if time.monotonic() >= stop_at:
            _stop(procs)
            break
        time.sleep(0.2)
    return failed or _first_failure(procs)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/local_nodes.py",
        description="Run one training as N torchrun nodes on this machine (127.0.0.1), one process each.",
    )
    parser.add_argument("nodes", type=int, help="how many nodes (torchrun --nnodes)")
    parser.add_argument(
        "overrides", nargs=argparse.REMAINDER, help="scripts/train.py overrides, e.g. trainer.max_epochs=1"
    )
    return parser.parse_args(argv)
