"""Tests for robustclip.distributed: 2 CPU ranks on gloo, each run bounded in time.

Ranks are started the way torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT in the environment): spawned Python processes that call the API,
bare ``python -m robustclip`` processes, and torchrun itself for the CLI.
"""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from click.testing import CliRunner

import robustclip.train as train_mod
from robustclip.checkpoint import read_checkpoint
from robustclip.cli import main
from robustclip.config import Config, override, to_toml
from robustclip.data import DatasetInfo
from robustclip.distributed import Context, epoch_batches, launch, my_batches, on_main, part
from robustclip.errors import RobustclipError
from robustclip.models import MODELS, Normalize
from robustclip.train import train

RUN_TIMEOUT = 120  # seconds, per multi-process run
TINY = [
    "data.synthetic=true", "data.augment=true", "train.limit_train=96", "train.limit_test=32",
    "train.batch_size=32", "train.epochs=2", "method.init_delay=1", "method.clip_steps=2",
    "method.init_iters=10", "method.max_rounds=1", "method.refine_iters=3",
    "method.descent_steps=2", "log.progress=false", "log.tensorboard=false", "train.device=cpu",
]


def _plain(info: DatasetInfo, width: int = 4) -> nn.Module:
    """A BatchNorm-free conv net: ranks see different batches but no local statistics."""
    c, h, w = info.shape
    return nn.Sequential(Normalize(info.mean, info.std), nn.Conv2d(c, width, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(width * h * w, info.num_classes))


def _register_plain() -> None:
    MODELS["plain"] = _plain


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setitem(MODELS, "plain", _plain)
    yield
    torch.set_num_threads(threads)


def tiny(model: str, method: str, *extra: str) -> Config:
    return override(Config(), [*TINY, f"model.name={model}", f"method.name={method}",
                               "model.args.width=4" if model == "plain" else "model.args.channels=4",
                               *extra])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
            "ROBUSTCLIP_TIMEOUT": "30"}


def _entry(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    os.environ.update(_rank_env(rank, world, port))
    torch.set_num_threads(1)
    fn(rank, *args)


def run_ranks(fn: Callable[..., None], *args: Any, world: int = 2) -> None:
    """``fn(rank, *args)`` in ``world`` spawned ranks; fail on an error or after RUN_TIMEOUT."""
    ctx = mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + RUN_TIMEOUT
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks still running after {RUN_TIMEOUT} s")


def _train_rank(rank: int, config: Config, out: Path, dump: Path, sync: bool = True) -> None:
    """Train on this rank; save the model's final state as ``dump/rank<r>.pt``."""
    _register_plain()
    built, real = [], train_mod.build_model
    train_mod.build_model = lambda *a, **k: built.append(real(*a, **k)) or built[-1]
    if not sync:
        train_mod.sync_after_step = lambda model, ctx: None
    train(config, out)
    torch.save(built[0].state_dict(), dump / f"rank{rank}.pt")


def _states(dump: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return tuple(torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))


# ---------------------------------------------------------------------------- sharding

def test_sharding_does_not_depend_on_the_rank_layout():
    for world in (1, 2, 3, 5):
        ranks = [Context(rank=r, world_size=world) for r in range(world)]
        for m in (0, 1, 7, 32):
            shares = [range(m)[part(m, c)] for c in ranks]
            assert [i for s in shares for i in s] == list(range(m))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert sorted(i for c in ranks for i in my_batches(7, c)) == list(range(7))
    batches = epoch_batches(100, 32, seed=1, epoch=3)
    assert [len(b) for b in batches] == [32, 32, 32, 4]
    assert sorted(torch.cat(batches).tolist()) == list(range(100))
    assert all(torch.equal(a, b) for a, b in zip(batches, epoch_batches(100, 32, seed=1, epoch=3)))
    assert not torch.equal(batches[0], epoch_batches(100, 32, seed=1, epoch=4)[0])
    assert [len(epoch_batches(97, 32, seed=1, epoch=0, min_size=w)) for w in (1, 2)] == [4, 3]


def test_single_process_without_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with launch(torch.device("cpu")) as ctx:
        assert (ctx.distributed, ctx.rank, ctx.world_size, ctx.main) == (False, 0, 1, True)


@pytest.mark.parametrize("env, backend, message", [
    ({}, "nccl", "backend nccl needs CUDA"),
    ({"ROBUSTCLIP_BACKEND": "mpii"}, None, "unknown backend 'mpii'"),
    ({"ROBUSTCLIP_TIMEOUT": "soon"}, None, "ROBUSTCLIP_TIMEOUT must be a positive number"),
    ({"RANK": "2"}, None, "bad torchrun environment: RANK=2, WORLD_SIZE=2"),
])
def test_bad_launch_settings_are_one_line_errors(monkeypatch, env, backend, message):
    for key, value in {**_rank_env(0, 2, 1), **env}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RobustclipError, match=message):
        with launch(torch.device("cpu"), backend):
            pass


# ---------------------------------------------------------------------------- training

@pytest.mark.parametrize("sync", [True, False], ids=["synced", "without-sync"])
def test_ranks_hold_identical_weights_and_spectral_state(tmp_path, sync):
    """Composite conv+BN with clip events every 2 steps and a per-step rescale against local
    BatchNorm statistics: after training, every parameter and buffer is the same on both
    ranks (and in rank 0's checkpoint).  Without the sync they drift apart."""
    config = tiny("simpleconv-composite", "fastclip-composite")
    run_ranks(_train_rank, config, tmp_path / "run", tmp_path, sync)
    a, b = _states(tmp_path)
    assert a.keys() == b.keys() and a["conv1.vectors"].shape[0] == 5  # 1 + 4 extra vectors
    same = {k for k in a if torch.equal(a[k], b[k])}
    if not sync:
        assert {"conv1.module.bn.running_var", "conv1.module.bn.weight"} - same
        return
    assert same == set(a)
    ckpt = read_checkpoint(tmp_path / "run")
    assert all(torch.equal(v, a[k]) for k, v in ckpt["state_dict"].items())
    assert int(a["conv1.step"]) == 6 and float(ckpt["metrics"][-1]["sigma/conv1"]) < 1.01


def _close(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_bn_free_two_ranks_match_one_process_and_resume_on_any_world_size(tmp_path):
    """2 ranks with per-rank batch b/2 (augmented, clip events; 91 samples: the last batch
    of 27 splits 14 + 13) == 1 process with batch b; the 2-rank checkpoint then resumes in
    1 process and ends where the 1-process run ends."""
    config = tiny("plain", "fastclip", "train.limit_train=91", "train.lr=0.05")
    one = train(override(config, ["train.epochs=1"]), tmp_path / "one")
    run_ranks(_train_rank, override(config, ["train.epochs=1"]), tmp_path / "two", tmp_path)
    a, b = _states(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref, got = read_checkpoint(one), read_checkpoint(tmp_path / "two")
    assert ref["global_step"] == got["global_step"] == 3
    _close(ref["state_dict"], got["state_dict"])
    _close({k: ref["metrics"][0][k] for k in ("train_loss", "test_acc", "sigma/1")},
           {k: got["metrics"][0][k] for k in ("train_loss", "test_acc", "sigma/1")})
    for run in (one, tmp_path / "two"):
        train(config, run, resume=True)
    ref, got = read_checkpoint(one), read_checkpoint(tmp_path / "two")
    assert ref["epoch"] == got["epoch"] == 1 and float(ref["metrics"][-1]["sigma/1"]) < 1.01
    _close(ref["state_dict"], got["state_dict"])


def _train_ranks_each(rank: int, configs: list[Config], root: Path) -> None:
    """:func:`_train_rank` for each config in turn, in one process group (that train uses
    as it is): the ranks start once."""
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    try:
        for i, config in enumerate(configs):
            _train_rank(rank, config, root / f"two{i}", root / f"dump{i}")
    finally:
        dist.destroy_process_group()


def test_adversarial_and_margin_training_on_two_ranks_match_one_process(tmp_path):
    """Each rank crafts on its share of the batch from the global batch's random start
    (TRADES: one DDP forward of clean + adversarial), or computes the margin's tracked L
    on its replica: 2 ranks (batch shares 14 + 13 at the end, augmented) == 1 process."""
    trades = tiny("plain", "fastclip", "train.limit_train=91", "train.lr=0.05", "train.epochs=1",
                  "train.adversarial.attack=pgd", "train.adversarial.steps=2",
                  "train.adversarial.eps=0.1", "train.adversarial.loss=trades",
                  "train.adversarial.monitor_samples=16", "train.adversarial.monitor_attack=pgd")
    margin = tiny("plain", "none", "train.limit_train=91", "train.lr=0.05", "train.epochs=1",
                  "train.loss=lipschitz-margin", "train.eps_cert=0.5")
    for i in range(2):
        (tmp_path / f"dump{i}").mkdir()
    run_ranks(_train_ranks_each, [trades, margin], tmp_path)
    for i, (config, keys) in enumerate([(trades, ["pgd_acc"]), (margin, [])]):
        a, b = _states(tmp_path / f"dump{i}")
        assert all(torch.equal(a[k], b[k]) for k in a)
        ref = read_checkpoint(train(config, tmp_path / f"one{i}"))
        got = read_checkpoint(tmp_path / f"two{i}")
        _close(ref["state_dict"], got["state_dict"])
        keys = ["train_loss", "train_acc", "test_acc", "sigma/1", *keys]
        _close({k: ref["metrics"][0][k] for k in keys}, {k: got["metrics"][0][k] for k in keys})


# ---------------------------------------------------------------------------- evaluation

SUITE = """
[eps]
Linf = [0.1, 0.3]
[[attack]]
name = "fgsm"
[[attack]]
name = "pgd"
steps = 2
rel_stepsize = 0.5
random_start = true
n_restarts = 2
"""


def _attack(args: list[str], dump: Path, tag: str) -> None:
    """``robustclip attack ARGS`` through the CLI; save its per-sample results and stdout."""
    import robustclip.commands as commands

    real, got = commands.evaluate, []
    commands.evaluate = lambda *a, **k: got.append(real(*a, **k)) or got[-1]
    try:
        result = CliRunner().invoke(main, args)
    finally:
        commands.evaluate = real
    assert result.exit_code == 0, result.output
    torch.save([(r.attack, r.eps, r.clean, r.robust) for r in got[0].results], dump / f"{tag}.pt")
    (dump / f"{tag}.txt").write_text(result.output)


def _attack_rank(rank: int, args: list[str], dump: Path) -> None:
    _attack(args, dump, f"rank{rank}")


def test_sharded_attack_table_equals_single_process(tmp_path, mnist_root):
    """5 batches (8, 8, 8, 8, 4) on 2 ranks (0, 2, 4 and 1, 3), PGD-2 with random starts and
    2 restarts, FGSM, their per-sample worst case: per sample the same as one process, on
    both ranks; rank 0 alone prints and writes the table."""
    config = tiny("simpleconv-composite", "fastclip-composite", "train.epochs=1", "data.synthetic=false",
                  "data.augment=false", "train.limit_train=512", "train.lr=0.05", "method.init_delay=100")
    run = train(config, tmp_path / "run", data_dir=mnist_root)
    (tmp_path / "suite.toml").write_text(SUITE)
    args = ["attack", str(run), "--suite", str(tmp_path / "suite.toml"), "--limit", "36",
            "--batch-size", "8", "--data-dir", str(mnist_root)]
    _attack([*args, "--out", str(tmp_path / "one")], tmp_path, "one")
    run_ranks(_attack_rank, [*args, "--out", str(tmp_path / "two")], tmp_path)
    ref = torch.load(tmp_path / "one.pt", weights_only=True)
    pgd = next(r for r in ref if r[:2] == ("pgd", 0.1))
    assert len(ref) == 6 and 0 < pgd[3].sum() < pgd[2].sum()  # some samples survive, not all
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert [r[:2] for r in got] == [r[:2] for r in ref]
        assert all(torch.equal(g[i], r[i]) for g, r in zip(got, ref) for i in (2, 3))
    a, b = (pd.read_csv(tmp_path / d / "results.csv").drop(columns="seconds") for d in ("one", "two"))
    pd.testing.assert_frame_equal(a, b)
    assert "wrote " in (tmp_path / "rank0.txt").read_text()
    assert (tmp_path / "rank1.txt").read_text() == ""


# ---------------------------------------------------------------------------- bad input

def test_world_size_above_sample_count_is_a_one_line_error(tmp_path):
    (tmp_path / "c.toml").write_text(to_toml(tiny("simpleconv", "none", "train.limit_train=1")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "robustclip", "train", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: world size 2 exceeds the 1 training samples: every rank needs "
                      "at least one; start fewer ranks"] * 2, done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("victim", [0, 1])
def test_killed_rank_makes_the_other_exit_with_an_error(tmp_path, victim):
    (tmp_path / "c.toml").write_text(to_toml(tiny("simpleconv", "fastclip", "train.epochs=1000")))
    port = _free_port()
    ranks = [subprocess.Popen([sys.executable, "-m", "robustclip", "train", "--config", str(tmp_path / "c.toml"),
                               "--out", str(tmp_path / "run")], env={**os.environ, **_rank_env(r, 2, port)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (tmp_path / "run" / "last.pt").exists():
            assert all(p.poll() is None for p in ranks) and time.monotonic() < deadline
            time.sleep(0.05)
        ranks[victim].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        survivor = ranks[1 - victim]
        assert survivor.wait(timeout=60) == 2
        assert time.monotonic() - killed_at < 30 + 5  # within ROBUSTCLIP_TIMEOUT
        last = survivor.stderr.read().strip().splitlines()[-1]
        assert last.startswith(f"error: rank {1 - victim}: lost the other ranks"), last
    finally:
        for p in ranks:
            p.kill()
            p.wait()
    assert read_checkpoint(tmp_path / "run")["epoch"] >= 0


def _disk_full_on_main(rank: int, dump: Path) -> None:
    def write() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(dump / "last.pt"))
    with launch(torch.device("cpu"), "gloo") as ctx:
        try:
            on_main(ctx, write)
        except RobustclipError as err:
            (dump / f"rank{rank}.txt").write_text(str(err))


def test_an_os_error_on_rank_0_is_one_line_on_every_rank(tmp_path):
    run_ranks(_disk_full_on_main, tmp_path)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == \
            f"{tmp_path / 'last.pt'}: No space left on device (ENOSPC)"
