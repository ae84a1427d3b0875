"""CPU thread count: a default that does not oversubscribe, --threads on every model command."""

import argparse

import pytest
import torch

from redrafter_trt.cli import bench as bench_cli
from redrafter_trt.cli import convert as convert_cli
from redrafter_trt.cli import run as run_cli
from redrafter_trt.cli import train as train_cli
from redrafter_trt.cmdline import (
    THREADS_ENV,
    add_threads_argument,
    apply_threads,
    default_threads,
    run_main,
)
from redrafter_trt.errors import RedrafterError


@pytest.fixture(autouse=True)
def keep_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "cores,ranks,want",
    [(2, 1, 2), (16, 1, 16), (16, 2, 8), (16, 32, 1), (1, 1, 1), (3, 2, 1)],
)
def test_default_threads_are_the_cores_shared_among_local_ranks(cores, ranks, want):
    n, why = default_threads(cores=cores, local_ranks=ranks)
    assert n == want and f"{cores} cores" in why


def test_default_threads_do_not_follow_the_load_average(monkeypatch):
    """The same command must choose the same way on the same machine, busy or not."""
    import os

    seen = []
    for load in (0.0, 0.78, 1.6, 9.0):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        seen.append(default_threads(cores=2, local_ranks=1))
    assert len(set(seen)) == 1 and seen[0][0] == 2


def test_apply_threads_order_flag_env_auto(monkeypatch):
    assert apply_threads(1) == (1, "--threads") and torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert apply_threads(None) == (2, "$OMP_NUM_THREADS")
    monkeypatch.setenv(THREADS_ENV, "1")
    assert apply_threads(None) == (1, f"${THREADS_ENV}") and torch.get_num_threads() == 1
    monkeypatch.setenv(THREADS_ENV, "zero")
    with pytest.raises(RedrafterError, match=THREADS_ENV):
        apply_threads(None)
    monkeypatch.delenv(THREADS_ENV)
    monkeypatch.delenv("OMP_NUM_THREADS")
    n, why = apply_threads(None)
    assert why.startswith("auto:") and n == torch.get_num_threads() == default_threads()[0]


def test_run_main_sets_threads_before_the_command():
    p = argparse.ArgumentParser(prog="x")
    add_threads_argument(p)
    seen = []
    assert (
        run_main(
            lambda a: seen.append((torch.get_num_threads(), a.threads_reason)),
            p,
            ["--threads", "1"],
        )
        == 0
    )
    assert seen == [(1, "--threads")]


@pytest.mark.parametrize(
    "parser,argv",
    [
        (run_cli.build_parser, ["--engine_dir", "e", "--input_text", "hi"]),
        (bench_cli.build_parser, ["--engine_dir", "e"]),
        (convert_cli.build_parser, ["--random_drafter", "--output_dir", "o"]),
        (train_cli.build_parser, ["train", "--data", "x", "--output_dir", "o"]),
        (train_cli.build_parser, ["gen-prompts", "--output", "o", "--num_prompts", "2"]),
        (train_cli.build_parser, ["gen-data", "--prompts", "x", "--output", "o"]),
        (train_cli.build_parser, ["eval", "--drafter_model_dir", "d", "--prompts", "x"]),
    ],
)
def test_every_model_command_takes_threads(parser, argv):
    p = parser()
    assert p.parse_args(argv + ["--threads", "3"]).threads == 3
    assert p.parse_args(argv).threads is None
    with pytest.raises(SystemExit):
        p.parse_args(argv + ["--threads", "0"])
