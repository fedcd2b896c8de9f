"""Scale-out: DDP through scripts/train.py (2 CPU processes, gloo) and the launcher and search configs."""

import json
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from pytorch_lightning.strategies import DDPStrategy

from mnist_adder.data.batches import EvalBatches
from mnist_adder.errors import UserError
from mnist_adder.ranks import RANK_VARIABLES, launcher_global_rank, on_rank_zero, rank_log_suffix
from mnist_adder.tools.local_nodes import node_command, train_overrides, wait_for_nodes
from mnist_adder.training.scaleout import check_process_launch
from mnist_adder.training.train import instantiate_group

from conftest import CONF_DIR, NO_DETECTOR, require_extra

ROOT = Path(__file__).resolve().parents[1]
DDP = "pytorch_lightning.strategies.DDPStrategy"


def compose_with_hydra(overrides: list[str]) -> DictConfig:
    """The config with its hydra node (launcher, sweeper), as a multirun would see it."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def rebuild(ckpt_path: Path) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """Model and datamodule from the config stored in the checkpoint, with its weights."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    config = checkpoint["hyper_parameters"]["config"]
    module = hydra.utils.instantiate(config["model"])
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval(), hydra.utils.instantiate(config["data"])


@pytest.mark.slow
def test_ddp_cpu_trains_in_one_folder_and_reduces_test_metrics_over_both_processes(tiny_mnist, tmp_path):
    log_dir = tmp_path / "logs"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/train.py",
            "trainer=ddp_cpu",
            f"paths.data_dir={tiny_mnist}",
            f"paths.log_dir={log_dir}",  # the default run folder pattern, with its timestamp
            "data.val_size=50",
            "data.batch_size=50",
            "data.eval_batch_size=40",
            "trainer.max_epochs=2",
            *NO_DETECTOR,
            "trainer.enable_progress_bar=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output  # the second process really ran

    # Rank 1 re-ran the script into the same folder: one run folder, one config, one metrics.json.
    runs = list((log_dir / "train" / "runs").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    assert [p.relative_to(log_dir) for p in log_dir.rglob(".hydra")] == [run.relative_to(log_dir) / ".hydra"]
    assert [p.name for p in log_dir.rglob("metrics.json")] == ["metrics.json"]
    assert output.count("Results (MNIST test set") == 1  # printed by rank zero only
    assert (run / "train_ddp_process_1.log").is_file()

    metrics = json.loads((run / "metrics.json").read_text())
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and Path(metrics["ckpt_path"]).name in checkpoints
    assert len(checkpoints) == 2  # last and best, each written once
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and len({e.name.split(".")[-2] for e in events}) == 1  # all from one process (pid)

    # The same checkpoint tested by one process on the whole test set gives the DDP run's numbers:
    # each rank saw half the test set, so they were reduced over both processes.
    module, datamodule = rebuild(Path(metrics["ckpt_path"]))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    single = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    for key, value in single.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key

    # ...and differ from what rank zero's half alone gives, so the check above can fail.
    images, labels = datamodule._splits["test"]
    half = EvalBatches(images, labels, datamodule._numbers["test"], 1000, rank=0, world_size=2)
    with torch.no_grad():
        image, number_onehot, label, sum_onehot = next(iter(half))
        digit_logits, sum_logits = module(image, number_onehot)
        half_loss = F.cross_entropy(digit_logits, label) + F.cross_entropy(sum_logits, sum_onehot.argmax(1))
    assert len(label) == len(labels) // 2
    assert float(half_loss) != pytest.approx(metrics["test/loss"], abs=1e-4)


def test_ddp_that_relaunches_the_script_is_refused_in_a_multirun(make_cfg):
    cfg = compose_with_hydra(["trainer=ddp_cpu", "hydra.mode=MULTIRUN"])
    hydra.core.hydra_config.HydraConfig().set_config(cfg)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=instantiate_group(None), logger=False)
    with pytest.raises(UserError, match="re-running the command line"):
        check_process_launch(trainer)
    single = hydra.utils.instantiate(make_cfg(["trainer=cpu"]).trainer, logger=False)
    check_process_launch(single)  # one process: nothing to re-launch


# What srun sets in task 1 of a 2-node job with one task per node (no SLURM cluster here: its variables).
SLURM_TASK_1_OF_2 = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "train",
    "SLURM_NTASKS": "2",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1",
    "SLURM_NODELIST": "node[1-2]",
}


def test_slurm_started_processes_may_train_in_a_multirun(monkeypatch):
    # The submitit launcher runs every SLURM task inside Hydra's multirun; nothing is re-launched there.
    for name, value in SLURM_TASK_1_OF_2.items():
        monkeypatch.setenv(name, value)
    cfg = compose_with_hydra(
        ["trainer=ddp_cpu", "trainer.num_nodes=2", "trainer.devices=1", "hydra.mode=MULTIRUN"]
    )
    hydra.core.hydra_config.HydraConfig().set_config(cfg)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert type(trainer.strategy.cluster_environment).__name__ == "SLURMEnvironment"
    assert (trainer.global_rank, trainer.node_rank, trainer.world_size) == (1, 1, 2)
    check_process_launch(trainer)
    # trainer.devices must be the tasks SLURM started on each node: one line saying so, before training.
    cfg = compose_with_hydra(["trainer=ddp_cpu", "trainer.num_nodes=2", "trainer.devices=2"])
    with pytest.raises(
        UserError, match=r"--ntasks-per-node=1` does not match.*trainer.devices = the processes"
    ):
        check_process_launch(hydra.utils.instantiate(cfg.trainer, logger=False))


def test_gpu_ddp_config_syncs_batchnorm_on_every_gpu(make_cfg):
    trainer = make_cfg(["trainer=ddp"]).trainer
    assert (trainer.strategy._target_, trainer.devices, trainer.sync_batchnorm) == (DDP, -1, True)
    assert trainer.accelerator == "gpu" and trainer.num_nodes == 1


@pytest.mark.parametrize("choice", ["ddp", "ddp_cpu"])
def test_multi_process_trainers_take_num_nodes_and_a_collective_timeout(make_cfg, choice):
    assert make_cfg([f"trainer={choice}"]).trainer.num_nodes == 1
    # The command of each node of a cluster: no "++", the key exists.
    cfg = make_cfg([f"trainer={choice}", "trainer.num_nodes=2", "trainer.strategy.timeout.seconds=30"])
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, DDPStrategy) and strategy._timeout == timedelta(seconds=30)
    assert cfg.trainer.num_nodes == 2


def test_cpu_ddp_builds_a_two_node_trainer_with_the_default_timeout(make_cfg):
    cfg = make_cfg(["trainer=ddp_cpu", "trainer.num_nodes=2", "trainer.devices=1"])
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 1, 2)
    assert trainer.strategy._timeout == timedelta(seconds=600)  # conf/trainer/ddp.yaml


def test_launcher_rank_names_each_processes_log_and_writes_the_config_once(monkeypatch):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert (launcher_global_rank(), rank_log_suffix(), on_rank_zero(".hydra")) == (0, "", ".hydra")
    monkeypatch.setenv("SLURM_PROCID", "3")  # srun
    assert (launcher_global_rank(), rank_log_suffix(), on_rank_zero(".hydra")) == (3, "_rank3", None)
    monkeypatch.setenv("RANK", "1")  # torchrun: its global rank wins over the SLURM task's
    assert (launcher_global_rank(), rank_log_suffix()) == (1, "_rank1")
    monkeypatch.setenv("RANK", "0")
    assert (launcher_global_rank(), on_rank_zero(".hydra")) == (0, ".hydra")
    # The Hydra settings that use them (resolved as a run resolves them).
    monkeypatch.setenv("RANK", "2")
    hydra_cfg = compose_with_hydra([]).hydra
    hydra_cfg.runtime.output_dir = "run"  # set by Hydra when a run starts
    assert hydra_cfg.output_subdir is None
    assert hydra_cfg.job_logging.handlers.file.filename.endswith("_rank2.log")


def test_local_nodes_command_is_torchrun_on_the_loopback_with_one_run_folder():
    args = train_overrides(2, ["trainer.max_epochs=1"], "${paths.log_dir}/x")
    assert args == [
        "trainer=ddp_cpu",
        "trainer.devices=1",
        "trainer.max_epochs=1",
        "trainer.num_nodes=2",
        "hydra.run.dir=${paths.log_dir}/x",
    ]
    # The user's trainer, devices and run folder are kept; the number of nodes is the script's own.
    kept = train_overrides(3, ["trainer=ddp", "trainer.devices=2", "hydra.run.dir=/runs/a"], "unused")
    assert kept == ["trainer=ddp", "trainer.devices=2", "hydra.run.dir=/runs/a", "trainer.num_nodes=3"]
    with pytest.raises(UserError, match="first argument"):
        train_overrides(2, ["trainer.num_nodes=4"], "unused")
    command = node_command(2, 1, 29511, args)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert command[3:8] == [
        "--nnodes=2",
        "--node_rank=1",
        "--nproc_per_node=1",
        "--master_addr=127.0.0.1",
        "--master_port=29511",
    ]
    assert command[8].endswith("scripts/train.py") and command[9:] == args


def test_hparams_search_config_optimises_validation_with_optuna():
    require_extra("hydra_plugins.hydra_optuna_sweeper", "sweep")
    cfg = compose_with_hydra(["hparams_search=small_optuna"])
    assert cfg.optimized_metric == "best_val/both_acc"
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {
        "model.optimizer.lr",
        "data.batch_size",
        "model.sum_weight",
        "model.net.backbone.channels",
    }
    assert compose_with_hydra([]).optimized_metric is None  # a plain run optimises nothing


def test_slurm_launcher_config_follows_the_trainer():
    require_extra("hydra_plugins.hydra_submitit_launcher", "slurm")
    cfg = compose_with_hydra(
        ["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "hydra.launcher.gpus_per_node=4"]
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)


def test_joblib_launcher_config_runs_jobs_in_parallel():
    require_extra("hydra_plugins.hydra_joblib_launcher", "joblib")
    launcher = compose_with_hydra(["hydra/launcher=local_parallel"]).hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 2


@pytest.mark.slow  # starts processes (1 s)
def test_local_nodes_stops_the_other_nodes_when_one_fails():
    # Real processes in place of torchrun nodes: one that fails at once, one that would run for 10 minutes.
    waiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    failing = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    assert wait_for_nodes([waiting, failing], grace_s=0.5) == (1, 3)
    assert waiting.returncode == -signal.SIGTERM  # stopped once the grace period had passed
    both_fine = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2)]
    assert wait_for_nodes(both_fine, grace_s=0.5) is None
