"""al.pipeline: 2- and 3-process pipelines end with the sequential run's weights; per-stage checkpoints resume
exactly after a crash; a stage that dies or hangs makes the other one stop with a clear error.

Every launched process runs in its own session with a deadline and is killed at teardown, so no test can
hang: launches through torchrun for the equivalence tests, ranks started directly (as torchrun would, with
RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT) elsewhere, so that the fault tests can kill or stop one stage.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from al.p2p import pack_body, unpack_body
from al.pipeline import balanced_split, main as pipeline_main
from al.stage_checkpoints import StageCheckpoints, checkpoints_to_keep, newest_common_step
from al.train import main as train_main
from al_helpers import REPO_ROOT, need_data, write_sentiment

DEADLINE = 150  # seconds any launched process may run


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def _stop(proc: subprocess.Popen) -> None:
    """Kills a launched process and everything in its session."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


@pytest.fixture
def launch():
    """``launch(argv, env=None)`` starts a process (own session, output to pipes); all are killed at teardown."""
    started = []

    def start(argv, env=None):
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO_ROOT, env=env or _env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            _stop(proc)


def _finish(proc: subprocess.Popen, timeout: float = DEADLINE) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers (their own sessions)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        _stop(proc)
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} ran past {timeout} s\nstdout:\n{out}\nstderr:\n{err[-4000:]}")
    return proc.returncode, out, err


def torchrun(launch, args, stages=2):
    """Runs ``torchrun --standalone --nproc-per-node STAGES -m al.pipeline ARGS``; returns stdout."""
    proc = launch(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(stages),
                   "-m", "al.pipeline", *args])
    code, out, err = _finish(proc)
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err[-6000:]}"
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(launch, args, world=2):
    """Starts the ranks of ``python -m al.pipeline ARGS`` directly, as torchrun would."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = _env()
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(launch(["-m", "al.pipeline", *args], env=env))
    return procs


def run_ranks(launch, args, world=2):
    """Runs the ranks of ``python -m al.pipeline ARGS`` to the end; returns the last rank's stdout."""
    results = [_finish(proc) for proc in start_ranks(launch, args, world)]
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {rank} exit {code}\nstdout:\n{out}\nstderr:\n{err[-6000:]}"
    return results[-1][1]


def _wait_for(condition, timeout, what, procs=()):
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"a rank exited ({proc.returncode}) before {what}:\n{proc.communicate()[1][-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.02)


def assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, msg=lambda m: f"{key}: {m}")


def assert_same_history(actual, expected) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, list):
                torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(value), msg=lambda m: f"{key}: {m}")
            else:
                assert got[key] == value, (key, got[key], value)


@pytest.fixture
def sentiment(tmp_path):
    (tmp_path / "labels.txt").write_text("negative\npositive\n")
    return write_sentiment(tmp_path / "train.tsv", 320, 0), write_sentiment(tmp_path / "test.tsv", 96, 1)


def lstm_args(sentiment, components=3):
    train, test = sentiment
    return ["--model", "lstm", "--train-file", str(train), "--test-file", str(test), "--components", str(components),
            "--hidden", "8", "--embedding-dim", "8", "--label-dim", "8", "--dropout", "0", "--batch-size", "16",
            "--lr", "3e-3", "--seed", "3"]


# ------------------------------------------------------------------------------- pipeline == sequential AL

def test_two_stage_mlp_on_mnist_matches_sequential(launch, tmp_path):
    need_data("mnist")
    common = ["--model", "mlp", "--dataset", "mnist", "--train-limit", "640", "--epochs", "1", "--hidden", "32",
              "--label-dim", "16", "--batch-size", "32", "--lr", "3e-3", "--seed", "1"]
    torchrun(launch, [*common, "--save-model", str(tmp_path / "pipe.pt"), "--results", str(tmp_path / "pipe.json"),
                      "--log-every", "0"])
    sequential = train_main([*common, "--method", "al", "--threads", "1", "--no-progress",
                             "--checkpoint", str(tmp_path / "seq.pt")])
    pipe = json.loads((tmp_path / "pipe.json").read_text())
    assert pipe["split"] in ([1, 2], [2, 1]) and pipe["batches"] == 20
    assert_same_state(torch.load(tmp_path / "pipe.pt"), torch.load(tmp_path / "seq.pt", weights_only=False)["model"])
    assert_same_history(pipe["history"], sequential["history"])  # losses and test accuracy after each epoch
    assert pipe["test_accuracy"] == sequential["test_accuracy"] and pipe["test_examples"] == 10000


def test_three_stage_seed_lstm_with_varying_lengths_matches_sequential(launch, tmp_path, sentiment):
    """First, middle and last stage; text batches of varying length (shapes change per message); the seed LSTM
    (--arch seed: embedding, LSTM, LSTM), so the LSTM state crosses a stage boundary inside s."""
    args = [*lstm_args(sentiment), "--arch", "seed", "--epochs", "1"]
    run_ranks(launch, [*args, "--save-model", str(tmp_path / "pipe.pt"), "--results", str(tmp_path / "pipe.json")],
              world=3)
    sequential = train_main([*args, "--method", "al", "--threads", "1", "--no-progress",
                             "--checkpoint", str(tmp_path / "seq.pt")])
    pipe = json.loads((tmp_path / "pipe.json").read_text())
    assert pipe["split"] == [1, 1, 1]
    assert_same_state(torch.load(tmp_path / "pipe.pt"), torch.load(tmp_path / "seq.pt", weights_only=False)["model"])
    assert_same_history(pipe["history"], sequential["history"])
    assert pipe["test_accuracy"] == sequential["test_accuracy"]


def test_single_stage_run_in_process_matches_sequential(tmp_path, sentiment):
    args = [*lstm_args(sentiment, components=2), "--epochs", "1"]
    summary = pipeline_main([*args, "--save-model", str(tmp_path / "pipe.pt"), "--log-every", "0"])
    sequential = train_main([*args, "--method", "al", "--threads", "1", "--no-progress",
                             "--checkpoint", str(tmp_path / "seq.pt")])
    assert summary["split"] == [2]
    assert_same_state(torch.load(tmp_path / "pipe.pt"), torch.load(tmp_path / "seq.pt", weights_only=False)["model"])
    assert summary["test_accuracy"] == sequential["test_accuracy"]


# ------------------------------------------------------------------------------------------------- faults

@pytest.mark.parametrize("every", [7, 10])
def test_resume_a_finished_run_for_another_epoch(tmp_path, sentiment, every):
    """1 epoch (20 batches), then --resume --epochs 2. every=7: the newest checkpoint is the one written when
    training ended, after the epoch's end; every=10: the one written at batch 20, before the epoch's end."""
    args = [*lstm_args(sentiment, components=2), "--checkpoint-dir", str(tmp_path / "ck"),
            "--checkpoint-every", str(every), "--log-every", "0"]
    pipeline_main([*args, "--epochs", "1"])
    resumed = pipeline_main([*args, "--epochs", "2", "--resume", "--save-model", str(tmp_path / "pipe.pt")])
    sequential = train_main([*lstm_args(sentiment, components=2), "--epochs", "2", "--method", "al", "--threads", "1",
                             "--no-progress", "--checkpoint", str(tmp_path / "seq.pt")])
    assert resumed["resumed_from"] == 20 and resumed["batches"] == 40
    assert_same_history(resumed["history"], sequential["history"])
    assert_same_state(torch.load(tmp_path / "pipe.pt"), torch.load(tmp_path / "seq.pt", weights_only=False)["model"])



def test_resume_after_a_stage_is_killed_matches_an_uninterrupted_run(launch, tmp_path, sentiment):
    """SIGKILL the last stage mid-training; the survivor stops with an error; --resume from the newest batch
    index both stages checkpointed trains every batch exactly once: same weights as a run never stopped."""
    args = [*lstm_args(sentiment), "--no-eval", "--checkpoint-every", "3", "--log-every", "0", "--timeout", "30"]
    crashed = tmp_path / "crashed"
    procs = start_ranks(launch, [*args, "--epochs", "1000", "--checkpoint-dir", str(crashed)])
    last_stage = StageCheckpoints(crashed, 1, 2, keep=2)
    _wait_for(lambda: any(step >= 12 for step in last_stage.steps()), DEADLINE, "checkpoint of batch 12", procs)
    procs[1].kill()
    code, _, err = _finish(procs[0], timeout=30)
    assert code == 1 and "stage 1" in err and "died" in err, err[-3000:]

    per_stage = [StageCheckpoints(crashed, r, 2, keep=2).steps() for r in range(2)]
    resume_at = newest_common_step(per_stage)
    assert resume_at is not None and resume_at >= 12, per_stage
    total = resume_at + 14  # usually across an epoch end (20 batches); never on a checkpoint (3 does not divide 14)
    out = run_ranks(launch, [*args, "--epochs", "1000", "--max-batches", str(total), "--checkpoint-dir",
                             str(crashed), "--resume", "--save-model", str(tmp_path / "resumed.pt"),
                             "--results", str(tmp_path / "resumed.json")])
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["resumed_from"] == resume_at and resumed["batches"] == total, out
    # The uninterrupted run: one stage in this process (it equals the 2-stage pipeline, tested above).
    pipeline_main([*args, "--epochs", "1000", "--max-batches", str(total), "--checkpoint-dir",
                   str(tmp_path / "straight"), "--save-model", str(tmp_path / "straight.pt")])
    assert_same_state(torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "straight.pt"))
    for rank in range(2):  # the final batch index is checkpointed too, at most `keep` files per stage
        steps = StageCheckpoints(crashed, rank, 2, keep=2).steps()
        assert steps[-1] == total and len(steps) <= checkpoints_to_keep(3, 2), steps


def test_killed_first_stage_stops_the_next_one_with_a_clear_error(launch, tmp_path, sentiment):
    args = [*lstm_args(sentiment), "--no-eval", "--epochs", "1000", "--checkpoint-every", "5",
            "--checkpoint-dir", str(tmp_path / "ck"), "--log-every", "0", "--timeout", "60"]
    procs = start_ranks(launch, args)
    last_stage = StageCheckpoints(tmp_path / "ck", 1, 2, keep=2)
    _wait_for(lambda: last_stage.steps(), DEADLINE, "checkpoint of the last stage", procs)
    procs[0].kill()
    killed = time.monotonic()
    code, _, err = _finish(procs[1], timeout=30)
    assert code == 1, err[-3000:]
    assert time.monotonic() - killed < 20  # a closed connection is noticed at once, well before --timeout
    assert "al.pipeline: stage 1: receiving from stage 0" in err and "died" in err, err[-3000:]
    assert "Traceback" not in err


def test_hung_stage_stops_the_previous_one_within_the_timeout(launch, tmp_path, sentiment):
    args = [*lstm_args(sentiment), "--no-eval", "--epochs", "1000", "--checkpoint-every", "5",
            "--checkpoint-dir", str(tmp_path / "ck"), "--log-every", "0", "--timeout", "3"]
    procs = start_ranks(launch, args)
    last_stage = StageCheckpoints(tmp_path / "ck", 1, 2, keep=2)
    _wait_for(lambda: last_stage.steps(), DEADLINE, "checkpoint of the last stage", procs)
    procs[1].send_signal(signal.SIGSTOP)  # alive but silent: only the timeout can tell
    stopped = time.monotonic()
    code, _, err = _finish(procs[0], timeout=40)
    elapsed = time.monotonic() - stopped
    assert code == 1, err[-3000:]
    assert 2 < elapsed < 30, elapsed
    assert "al.pipeline: stage 0: sending to stage 1" in err and "did not answer within the timeout" in err, err
    procs[1].send_signal(signal.SIGCONT)


# ---------------------------------------------------------------------------------------------- unit tests

def test_balanced_split_minimises_the_heaviest_stage():
    assert balanced_split([1, 1, 1, 1], 2) == [2, 2]
    assert balanced_split([4, 1, 1, 1, 1], 2) == [1, 4]
    assert balanced_split([1, 2, 3, 4], 2) == [3, 1]
    assert balanced_split([5, 5, 5], 3) == [1, 1, 1]
    assert balanced_split([3, 1, 1, 3], 3) == [1, 2, 1]
    with pytest.raises(ValueError, match="stages"):
        balanced_split([1, 1], 3)


def test_checkpoint_retention_and_consistent_boundary(tmp_path):
    assert checkpoints_to_keep(6, 2) == 2 and checkpoints_to_keep(4, 2) == 2 and checkpoints_to_keep(3, 2) == 3
    assert checkpoints_to_keep(1, 2) == 5 and checkpoints_to_keep(4, 3) == 3
    assert newest_common_step([[3, 6, 9], [3, 6]]) == 6
    assert newest_common_step([[9, 12], [3, 6]]) is None
    stage = StageCheckpoints(tmp_path, 0, 2, keep=2)
    for step in (3, 6, 9):
        stage.save(step, {"step": step})
    assert stage.steps() == [6, 9] and stage.load(9) == {"step": 9}
    assert not [p for p in stage.folder.iterdir() if p.name.endswith(".tmp")]
    (stage.folder / ".step-000000012.pt.123.tmp").write_bytes(b"partial")
    stage.remove_partial_writes()
    stage.discard_after(6)
    assert sorted(p.name for p in stage.folder.iterdir()) == ["step-000000006.pt"]
    StageCheckpoints(tmp_path, 0, 3, keep=2).folder.mkdir()
    with pytest.raises(ValueError, match="another number of stages"):
        stage.check_layout()


def test_pipeline_argument_errors():
    base = ["--model", "mlp", "--dataset", "mnist"]
    for extra in (["--resume"], ["--checkpoint-every", "5"], ["--threads", "0"], ["--timeout", "0"],
                  ["--backend", "nccl"]):
        with pytest.raises(SystemExit):
            pipeline_main([*base, *extra])


def test_message_body_round_trip_keeps_dtypes_shapes_and_values():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 5, generator=g), torch.tensor(7), torch.rand(2, 3, generator=g) > 0.5,
               torch.randint(-9, 9, (4, 1, 2), generator=g), torch.randn(0, 4), torch.randn(2, 3).to(torch.bfloat16),
               torch.randn(6, 7, generator=g).t(), torch.arange(5, dtype=torch.uint8)]
    body = pack_body(tensors, torch.device("cpu"))
    assert body.dtype == torch.uint8 and body.dim() == 1
    unpacked = unpack_body(body.clone(), len(tensors))
    assert len(unpacked) == len(tensors)
    for got, want in zip(unpacked, tensors):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="dimensions"):
        pack_body([torch.zeros([1] * 7)], torch.device("cpu"))
    with pytest.raises(TypeError, match="dtype"):
        pack_body([torch.zeros(2, dtype=torch.complex64)], torch.device("cpu"))
