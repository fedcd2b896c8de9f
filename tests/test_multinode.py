"""Several nodes, for real: torchrun processes on the loopback address, one training process each (gloo).

Each node is what one machine of a cluster runs (`torchrun --nnodes=2 --node_rank=R ... scripts/train.py
trainer=ddp_cpu trainer.num_nodes=2 trainer.devices=1`). The runs are 3 epochs of 3 steps on the tiny
IDX data: a two-node run through scripts/local_nodes.py, the same as one node of 2 processes, and a
two-node run whose node 1 is killed mid-run and which is then resumed on two nodes.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mnist_adder.tools.local_nodes import free_port, node_command, train_overrides

from conftest import NO_DETECTOR, make_tiny_mnist, tiny_data_overrides

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# One thread per training process in every run. Left alone, Lightning gives each of the 2 processes it
# starts on one node half the cores and torchrun's single process per node all of them; a different
# thread count sums inside a convolution in another order, and the losses then differ in the 6th digit
# (measured: test/loss 4.179507 against 4.179528, the accuracies equal).
ENV = os.environ | {"OMP_NUM_THREADS": "1"}
STEPS_PER_EPOCH = 3
EPOCHS = 3


def _overrides(data_dir: Path) -> list[str]:
    # One config for every run here, so that their numbers can be compared; the timeout bounds any wait
    # on a lost node in the kill test (gloo notices a killed process at once).
    return [
        *tiny_data_overrides(data_dir),
        f"trainer.max_epochs={EPOCHS}",
        *NO_DETECTOR,
        f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
        "trainer.limit_val_batches=1",
        "trainer.deterministic=true",
        "trainer.enable_progress_bar=false",
        "trainer.strategy.timeout.seconds=30",
        "extras.print_config=false",
        "seed=5",
    ]


def _local_nodes(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/local_nodes.py", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _final(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("test/") or k == "best_val/both_acc"}


def _ckpt(path: Path) -> dict:
    # "epoch": the epoch during which it was saved (an epoch-end save holds that epoch, not the next).
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return {"epoch": checkpoint["epoch"], "global_step": checkpoint["global_step"]}


FINAL = {"epoch": EPOCHS - 1, "global_step": EPOCHS * STEPS_PER_EPOCH}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_tiny_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def two_node_run(data_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """scripts/local_nodes.py 2: the log folder it wrote into and its output."""
    log_dir = tmp_path_factory.mktemp("two_nodes")
    result = _local_nodes("2", *_overrides(data_dir), f"paths.log_dir={log_dir}")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return log_dir, result


def test_two_nodes_on_the_loopback_write_one_run_folder(two_node_run):
    log_dir, result = two_node_run
    output = result.stdout + result.stderr
    assert "[node 1] " in output and "GLOBAL_RANK: 1, MEMBER: 2/2" in output  # node 1 trained too
    assert "[local_nodes] 2 nodes on 127.0.0.1:" in output and "trainer.num_nodes=2" in output
    runs = list((log_dir / "train" / "runs").iterdir())
    assert len(runs) == 1, runs  # both nodes in the one folder the script chose
    run = runs[0]
    assert [p.relative_to(log_dir) for p in log_dir.rglob("metrics.json")] == [
        run.relative_to(log_dir) / "metrics.json"
    ]
    assert output.count("Results (MNIST test set") == 1  # printed by global rank 0 only
    # One config, written by rank 0; each node its own log.
    assert [p.parent for p in log_dir.rglob(".hydra")] == [run]
    assert sorted(p.name for p in run.glob("*.log")) == ["train.log", "train_rank1.log"]
    assert "GLOBAL_RANK: 1" in (run / "train_rank1.log").read_text()
    assert "GLOBAL_RANK: 1" not in (run / "train.log").read_text()
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and len(checkpoints) == 2
    assert _ckpt(run / "checkpoints" / "last.ckpt") == FINAL
    # Every epoch value was already reduced over all processes (torchmetrics): nothing left to warn of.
    assert "sync_dist" not in output


def test_two_nodes_test_like_one_node_of_two_processes(two_node_run, data_dir, tmp_path):
    log_dir, _ = two_node_run
    two_nodes = json.loads(next(log_dir.rglob("metrics.json")).read_text())
    one_node = subprocess.run(
        [
            sys.executable,
            "scripts/train.py",
            "trainer=ddp_cpu",  # devices=2: Lightning starts the second process
            *_overrides(data_dir),
            f"hydra.run.dir={tmp_path / 'one_node'}",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    one_node_metrics = json.loads((tmp_path / "one_node" / "metrics.json").read_text())
    # Same seed, same 2 processes, same shards: the same numbers, to the last digit.
    assert _final(two_nodes) == _final(one_node_metrics)
    assert len(_final(two_nodes)) > 10  # losses, accuracies, ECE, per-class lists, best validation


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _wait_for_file(path: Path, procs: list[subprocess.Popen], timeout: float = 200) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        failed = [p for p in procs if p.poll() is not None]
        if failed:
            pytest.fail(f"a node ended (status {failed[0].returncode}) before {path} was written")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} not written within {timeout} s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def killed_run(data_dir, tmp_path_factory) -> dict:
    """Two torchrun nodes started as two machines would; node 1 (torchrun and its training process) is
    killed once the first epoch's last.ckpt exists. What node 0 did then."""
    run = tmp_path_factory.mktemp("killed") / "run"
    args = train_overrides(2, _overrides(data_dir), str(run))
    port = free_port()
    logs = [run.parent / f"node{rank}.out" for rank in range(2)]
    nodes = []
    for rank, log in enumerate(logs):
        with log.open("w") as out:
            nodes.append(
                subprocess.Popen(
                    node_command(2, rank, port, args), cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT
                )
            )
    try:
        _wait_for_file(run / "checkpoints" / "last.ckpt", nodes)
        workers = _children(nodes[1].pid)
        assert workers, "node 1's training process not found"
        for pid in workers:  # its machine is gone: the training process and torchrun
            os.kill(pid, signal.SIGKILL)
        nodes[1].kill()
        nodes[0].wait(timeout=120)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
            node.wait()
    return {"run": run, "node0": nodes[0], "output": logs[0].read_text()}


def test_killing_one_node_ends_the_other_with_one_clear_message(killed_run):
    output, run = killed_run["output"], killed_run["run"]
    assert killed_run["node0"].returncode != 0
    # Ended, not hung: the fixture's wait bounds it (120 s); how fast gloo notices is no test's business
    # on a machine that may be running other work (it was seconds on an idle one).
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-4000:]
    assert "lost contact with another process of this run during training" in errors[0]
    assert "global rank 0 of 2 processes on 2 node(s)" in errors[0]
    assert f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in errors[0]  # how to continue
    # Through the project's error path (exit status 2), not a traceback; torchrun's own report of the
    # failed process follows it.
    worker_output = output.split("failed (exitcode: 2)", 1)[0]
    assert "Traceback" not in worker_output and "[rank0]:" not in worker_output
    assert not (run / "metrics.json").exists()


def test_two_nodes_resume_the_killed_run_to_the_uninterrupted_numbers(
    killed_run, two_node_run, data_dir, tmp_path
):
    run = killed_run["run"]
    last = run / "checkpoints" / "last.ckpt"
    resumed_from = _ckpt(last)
    assert STEPS_PER_EPOCH <= resumed_from["global_step"] < FINAL["global_step"]  # killed mid-run
    # The same command as the killed run's, plus ckpt_path; this command's own folder is new.
    session = tmp_path / "resume"
    result = _local_nodes("2", *_overrides(data_dir), f"ckpt_path={last}", f"hydra.run.dir={session}")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    # It continued in the killed run's folder, from the checkpoint's epoch to the end.
    assert (session / "resumed_into.txt").read_text().strip() == str(run.resolve())
    assert len((run / "resumes.txt").read_text().splitlines()) == 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(last)
    assert _ckpt(last) == FINAL
    log_dir, _ = two_node_run
    uninterrupted = json.loads(next(log_dir.rglob("metrics.json")).read_text())
    assert _final(metrics) == _final(uninterrupted)


def test_local_nodes_fails_with_the_nodes_own_messages(data_dir):
    # 2 processes per node in the trainer, 1 started by torchrun on each: every node refuses, in one line.
    result = _local_nodes("2", *_overrides(data_dir), "trainer.devices=2")
    assert result.returncode == 2
    lines = result.stdout.splitlines()
    for rank in (0, 1):
        own = [i for i, line in enumerate(lines) if line.startswith(f"[node {rank}] error: ")]
        assert len(own) == 1, result.stdout[-4000:]
        assert "does not match the world size" in lines[own[0]] and "--nproc_per_node" in lines[own[0]]
        # No traceback of the training process before it (torchrun's own report comes after).
        assert f"[node {rank}] Traceback (most recent call last):" not in lines[: own[0]]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "failed first (exit status 1)" in errors[0], result.stderr
