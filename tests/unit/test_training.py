"""Training pieces without Prefect: the checkpoint store, the context, the example's determinism, the
spot watcher against a real HTTP server, the command runner with a real subprocess, and parameters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from jobbridge.errors import JobFailedError, JobValidationError
from jobbridge.registry import get_spec
from jobbridge.training.checkpoints import LATEST, CheckpointError, CheckpointStore
from jobbridge.training.command import CommandTraining, run_command
from jobbridge.training.context import TrainContext
from jobbridge.training.examples import linear_regression
from jobbridge.training.runner import run_entry_point
from jobbridge.training.spot import SpotNotice, SpotWatcher
from tests.support.helpers import free_port, pid_alive, wait_for

ENTRY_POINT = "jobbridge.training.examples:linear_regression"
ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------------
# Checkpoint store


def test_state_round_trips_arrays_bit_exact_and_json_values(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"))
    assert store.latest() is None
    weights = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    rng_state = np.random.default_rng(2).bit_generator.state  # 128-bit integers inside
    saved = store.save_state(7, {"weights": weights, "rng": rng_state, "lr": np.float64(0.5), "name": "x"})
    assert saved.step == 7 and saved.url.endswith("/step-7")
    assert store.latest() == saved
    loaded = store.load_state(saved)
    assert loaded["weights"].dtype == np.float32 and loaded["weights"].tobytes() == weights.tobytes()
    assert loaded["rng"] == rng_state and loaded["lr"] == 0.5 and loaded["name"] == "x"


def test_state_that_would_need_pickle_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"))
    with pytest.raises(CheckpointError, match="no pickle"):
        store.save_state(1, {"model": object()})
    with pytest.raises(CheckpointError, match="without pickle"):
        store.save_state(1, {"objects": np.array([object()], dtype=object)})
    assert store.latest() is None and store.steps() == []
    root = tmp_path / "ckpt"
    assert not root.exists() or not any(root.iterdir())


def test_only_the_newest_checkpoints_are_kept(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"), keep=2)
    for step in (10, 20, 30, 40):
        store.save_state(step, {"step": step})
    assert store.steps() == [30, 40]
    assert store.latest() is not None and store.latest().step == 40  # type: ignore[union-attr]


def test_a_killed_writer_leaves_latest_on_a_complete_checkpoint(tmp_path: Path) -> None:
    """Writers SIGKILLed at arbitrary moments: ``latest`` always names a complete, loadable checkpoint."""
    root = tmp_path / "ckpt"
    writer = textwrap.dedent(
        f"""
        import numpy as np, sys
        from jobbridge.training.checkpoints import CheckpointStore
        store = CheckpointStore({str(root)!r}, keep=2)
        start = int(sys.argv[1])
        print("ready", flush=True)
        for step in range(start, start + 1000):
            store.save_state(step, {{"w": np.full(1_000_000, float(step)), "step": step}})
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    last = 0
    for round_number, delay in enumerate((0.05, 0.11, 0.17, 0.23)):
        process = subprocess.Popen(
            [sys.executable, "-c", writer, str(last + 1)], env=env, stdout=subprocess.PIPE, text=True
        )
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        store = CheckpointStore(str(root), keep=2)

        # Wait until it is mid-stream (a checkpoint newer than the last round's exists), then kill it.
        def advanced(store: CheckpointStore = store, last: int = last) -> bool:
            latest = store.latest()
            return latest is not None and latest.step > last

        wait_for(f"round {round_number}: a new checkpoint", advanced, timeout=30, interval=delay / 10)
        process.send_signal(signal.SIGKILL)
        process.wait()
        latest = store.latest()
        assert latest is not None and latest.step > last
        state = store.load_state(latest)
        assert state["step"] == latest.step and np.all(state["w"] == float(latest.step))
        last = latest.step
    pointer = json.loads((root / LATEST).read_text())
    assert pointer["step"] == last
    # What a killed writer may leave behind is cleared when the next attempt starts.
    store.clear_partial()
    assert all(not p.name.startswith(".tmp-") for p in root.iterdir())


def test_a_complete_step_not_yet_pointed_at_is_kept_and_latest_moves_last(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"))
    store.save_state(1, {"v": 1})
    # A writer killed after moving step-2 into place but before writing the pointer:
    orphan = CheckpointStore(str(tmp_path / "other"))
    orphan.save_state(2, {"v": "first attempt"})
    (tmp_path / "other" / "step-2").rename(tmp_path / "ckpt" / "step-2")
    assert store.latest() is not None and store.latest().step == 1  # type: ignore[union-attr]
    again = store.save_state(2, {"v": "second attempt"})
    assert store.latest() == again
    assert store.load_state(again)["v"] == "first attempt"  # complete already: never replaced


def test_directory_checkpoints_round_trip(tmp_path: Path) -> None:
    source = tmp_path / "out" / "step-5"
    (source / "nested").mkdir(parents=True)
    (source / "model.bin").write_bytes(b"\x00\x01" * 1000)
    (source / "nested" / "meta.json").write_text('{"a": 1}')
    store = CheckpointStore(str(tmp_path / "ckpt"))
    saved = store.save_directory(5, source)
    restored = store.download(saved, tmp_path / "restored")
    assert (restored / "model.bin").read_bytes() == b"\x00\x01" * 1000
    assert (restored / "nested" / "meta.json").read_text() == '{"a": 1}'


def test_checkpoint_keys_are_one_safe_path_segment(tmp_path: Path) -> None:
    for bad in ("../etc", "a/b", "", ".hidden"):
        with pytest.raises(JobValidationError, match="checkpoint key"):
            CheckpointStore.for_key(bad)


# --------------------------------------------------------------------------------------------------
# The example and the context


def run_example(store: CheckpointStore, steps: int, stop_after: int | None = None, **config: Any) -> Any:
    ctx: TrainContext

    def stop() -> bool:
        return stop_after is not None and ctx.step >= stop_after

    ctx = TrainContext(config=config, steps=steps, checkpoint_every=25, store=store, stop=stop)
    return run_entry_point(ENTRY_POINT, ctx)


@pytest.mark.parametrize("stop_after", [1, 37, 50, 199])
def test_interrupted_and_resumed_training_ends_with_the_same_weights(tmp_path: Path, stop_after: int) -> None:
    whole = run_example(CheckpointStore(str(tmp_path / "whole")), 200)
    assert not whole.interrupted and whole.start_step == 0 and whole.step == 200

    store = CheckpointStore(str(tmp_path / "split"))
    first = run_example(store, 200, stop_after=stop_after)
    assert first.interrupted and first.step == stop_after
    assert first.checkpoint is not None and first.checkpoint.step == stop_after  # saved at once on stop
    second = run_example(store, 200)
    assert not second.interrupted and second.start_step == stop_after
    assert second.output["weights_sha256"] == whole.output["weights_sha256"]
    final = store.load_state(store.latest())  # type: ignore[arg-type]
    assert final["weights"].tobytes() == np.array(whole.output["weights"]).tobytes()


def test_the_example_learns_and_its_seed_matters(tmp_path: Path) -> None:
    one = run_example(CheckpointStore(str(tmp_path / "a")), 300, seed=1)
    other = run_example(CheckpointStore(str(tmp_path / "b")), 300, seed=2)
    assert one.output["weight_error"] < 0.1 and one.output["mse"] < 0.05
    assert one.output["weights_sha256"] != other.output["weights_sha256"]
    with pytest.raises(ValueError, match="not known"):
        run_example(CheckpointStore(str(tmp_path / "c")), 10, learning_rat=0.1)


def test_checkpoints_every_n_steps_and_after_the_last(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"), keep=100)
    ctx = TrainContext(config={}, steps=110, checkpoint_every=25, store=store)
    linear_regression(ctx)
    assert store.steps() == [25, 50, 75, 100, 110]
    assert not ctx.interrupted and ctx.finished


# --------------------------------------------------------------------------------------------------
# Spot watcher against a real HTTP server


class MetadataServer:
    """Serves the spot notice path: 404, a notice, or whatever status/body is set; optional IMDSv2."""

    PATH = "/latest/meta-data/spot/instance-action"

    def __init__(self, *, token_required: bool = False) -> None:
        self.status, self.body = 404, b""
        self.token_required = token_required
        self.token = "t0ken"
        self.requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                assert self.path == "/latest/api/token"
                assert self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                self._reply(200, owner.token.encode())

            def do_GET(self) -> None:
                owner.requests += 1
                if owner.token_required and self.headers.get("X-aws-ec2-metadata-token") != owner.token:
                    self._reply(401, b"")
                elif self.path != owner.PATH:
                    self._reply(404, b"")
                else:
                    self._reply(owner.status, owner.body)

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{self.PATH}"

    def notify(self, action: str = "terminate") -> None:
        self.body = json.dumps({"action": action, "time": "2030-01-01T00:02:00Z"}).encode()
        self.status = 200


@pytest.fixture
def metadata() -> Iterator[MetadataServer]:
    server = MetadataServer()
    yield server
    server.server.shutdown()
    server.server.server_close()


def test_watcher_sees_a_notice_only_once_one_is_served(metadata: MetadataServer) -> None:
    with SpotWatcher(metadata.url, 0.02) as watcher:
        wait_for("a few polls", lambda: metadata.requests >= 3, 10, 0.01)
        assert not watcher.is_set() and watcher.notice is None
        metadata.notify()
        assert watcher.wait(10)
    assert watcher.notice == SpotNotice("terminate", "2030-01-01T00:02:00Z")
    assert "terminate at 2030-01-01T00:02:00Z" in watcher.notice.describe()


@pytest.mark.parametrize(
    ("status", "body"), [(403, b"forbidden"), (500, b""), (200, b"<html>captive portal</html>"), (200, b"{}")]
)
def test_answers_that_are_not_notices_never_stop_a_job(
    metadata: MetadataServer, status: int, body: bytes
) -> None:
    metadata.status, metadata.body = status, body
    watcher = SpotWatcher(metadata.url, 1.0)
    with httpx.Client() as client:
        assert watcher.poll_once(client) is None


def test_unreachable_endpoint_means_no_notice() -> None:
    watcher = SpotWatcher(f"http://127.0.0.1:{free_port()}/latest/meta-data/spot/instance-action", 1.0)
    with httpx.Client() as client:
        assert watcher.poll_once(client) is None


def test_imdsv2_token_is_fetched_when_required() -> None:
    server = MetadataServer(token_required=True)
    try:
        server.notify("stop")
        watcher = SpotWatcher(server.url, 1.0)
        with httpx.Client() as client:
            assert watcher.poll_once(client) == SpotNotice("stop", "2030-01-01T00:02:00Z")
    finally:
        server.server.shutdown()
        server.server.server_close()


# --------------------------------------------------------------------------------------------------
# Commands: a real subprocess that writes its own checkpoints


TRAINER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    ckpt = os.environ["JOBBRIDGE_CHECKPOINT_DIR"]
    start = int(os.environ["JOBBRIDGE_START_STEP"])
    steps = int(os.environ["JOBBRIDGE_TRAIN_STEPS"])
    every = int(os.environ["JOBBRIDGE_CHECKPOINT_EVERY"])
    config = json.loads(os.environ["JOBBRIDGE_TRAIN_CONFIG"])
    total = 0
    if os.environ["JOBBRIDGE_RESUME_FROM"]:
        with open(os.path.join(os.environ["JOBBRIDGE_RESUME_FROM"], "total")) as f:
            total = int(f.read())
    stopping = False
    def on_term(signum, frame):
        global stopping
        stopping = True
    signal.signal(signal.SIGTERM, on_term)
    def save(step):
        tmp = os.path.join(ckpt, f".step-{step}.tmp")
        os.makedirs(tmp)
        with open(os.path.join(tmp, "total"), "w") as f:
            f.write(str(total))
        os.rename(tmp, os.path.join(ckpt, f"step-{step}"))
    print(f"starting at {start}", flush=True)
    for step in range(start + 1, steps + 1):
        total += step * config["factor"]
        time.sleep(config["delay"])
        if step % every == 0 or step == steps or stopping:
            save(step)
        if stopping:
            print(f"stopped at {step}", flush=True)
            sys.exit(0)
    print(f"total {total}", flush=True)
    """
)


def command_training(store: CheckpointStore, stop: Any, lines: list[str]) -> CommandTraining:
    return CommandTraining(
        command=[sys.executable, "-c", TRAINER],
        store=store,
        steps=60,
        checkpoint_every=10,
        config={"factor": 2, "delay": 0.01},
        stop=stop,
        on_output=lines.append,
        grace_seconds=10,
        poll_seconds=0.02,
    )


def test_command_is_stopped_by_sigterm_checkpoints_and_resumes(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"))
    lines: list[str] = []
    first = run_command(command_training(store, lambda: (store.latest() or None) is not None, lines))
    assert first.interrupted and first.checkpoint is not None
    assert first.step == first.checkpoint.step >= 10  # its SIGTERM checkpoint was uploaded
    assert any(line.startswith("stopped at") for line in lines)

    lines.clear()
    second = run_command(command_training(store, lambda: False, lines))
    assert not second.interrupted and second.start_step == first.step and second.step == 60
    assert lines[0] == f"starting at {first.step}"
    assert lines[-1] == f"total {sum(range(1, 61)) * 2}"  # the same total as an uninterrupted run


def test_a_run_stopped_while_its_command_runs_leaves_no_process_behind(tmp_path: Path) -> None:
    """The flow run itself is stopped (cancelled: Prefect raises in the waiting thread)."""
    store = CheckpointStore(str(tmp_path / "ckpt"))
    pid_file = tmp_path / "pid"
    script = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(300)"

    def cancelled() -> bool:
        if pid_file.exists() and pid_file.read_text():
            raise KeyboardInterrupt  # stands for Prefect's TerminationSignal (a BaseException too)
        return False

    training = CommandTraining(
        command=[sys.executable, "-c", script],
        store=store,
        steps=10,
        checkpoint_every=5,
        stop=cancelled,
        grace_seconds=30,
        poll_seconds=0.02,
    )
    with pytest.raises(KeyboardInterrupt):
        run_command(training)
    pid = int(pid_file.read_text())
    wait_for("the command's process to be gone", lambda: not pid_alive(pid), timeout=10)


def test_a_failing_command_fails_with_its_last_output(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"))
    training = CommandTraining(
        command=[sys.executable, "-c", "import sys; print('bad config'); sys.exit(3)"],
        store=store,
        steps=10,
        checkpoint_every=5,
    )
    with pytest.raises(JobFailedError, match=r"status 3(.|\n)*bad config"):
        run_command(training)


# --------------------------------------------------------------------------------------------------
# Parameters: checked at submission, errors name the field


def validate(**parameters: Any) -> dict[str, Any]:
    return get_spec("train").validate_parameters(parameters)


def test_valid_parameters_and_the_legacy_type_name() -> None:
    assert validate(entry_point=ENTRY_POINT, steps=10)["entry_point"] == ENTRY_POINT
    assert validate(command="python train.py --lr '0.1 0.2'", steps=5)["command"] == [
        "python",
        "train.py",
        "--lr",
        "0.1 0.2",
    ]
    assert get_spec("training").name == "train"  # receipt_trainer's name for it


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"entry_point": ENTRY_POINT}, "parameter 'steps' is required"),
        ({"entry_point": ENTRY_POINT, "steps": 0}, "parameter 'steps'"),
        ({"entry_point": ENTRY_POINT, "steps": 5, "checkpoint_every": 0}, "parameter 'checkpoint_every'"),
        ({"entry_point": "no_such_module_xyz:train", "steps": 5}, "'entry_point'.*cannot be imported"),
        ({"entry_point": "jobbridge.training.examples:nope", "steps": 5}, "'entry_point'.*no attribute"),
        ({"entry_point": "not an entry point", "steps": 5}, "parameter 'entry_point'.*form"),
        ({"command": [], "steps": 5}, "parameter 'command'.*empty"),
        ({"command": "", "steps": 5}, "parameter 'command'.*empty"),
        ({"steps": 5}, "exactly one of 'entry_point' and 'command' \\(neither"),
        ({"entry_point": ENTRY_POINT, "command": "x", "steps": 5}, "exactly one.*\\(both"),
        ({"entry_point": ENTRY_POINT, "steps": 5, "checkpoint_key": "../x"}, "parameter 'checkpoint_key'"),
        ({"entry_point": ENTRY_POINT, "steps": 5, "keep_checkpoints": 0}, "parameter 'keep_checkpoints'"),
        ({"entry_point": ENTRY_POINT, "steps": 5, "stepz": 5}, "parameter 'stepz' is not a parameter"),
    ],
)
def test_bad_parameters_are_refused_naming_the_field(parameters: dict[str, Any], message: str) -> None:
    with pytest.raises(JobValidationError, match=message):
        validate(**parameters)
