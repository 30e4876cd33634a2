"""Tensor- and expert-parallel serving under torchrun: every rank holds a shard, rank 0 alone serves.

    torchrun --nproc-per-node 2 -m dg_edit.cli serve --parallel tp --model DIR
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:PORT --nproc-per-node 8 \\
        -m dg_edit.cli lsp --tcp 127.0.0.1:2087 --parallel ep --model DIR

Why this shape: a sharded forward is a collective; every rank must run the same forwards in the same
order, or the launch hangs. dg-edit's front ends (websocket service, language server, `infill --json`)
run several requests at once, and each engine's scheduler batches their denoising steps into one
decoder forward per step (dg_edit/scheduler.py). So two things are mirrored: the calls that change an
engine (open a request, forget a document, re-wrap with other settings, retire an engine) and each
scheduler step. Rank 0's front end gets a `ParallelEngine` with the `Engine` interface; each call on it
is first broadcast to every rank, then run on rank 0's own engine, under one lock. Rank 0's scheduler
decides each step (which waiting requests join the batch, which consumers have gone: a `StepPlan`) and
broadcasts it the same way, and every rank's scheduler applies it (`Scheduler.lockstep`): the same
requests, opened in the same order, run the same batched forwards on every rank. The engine itself does
not know it is sharded: transformers' own tensor- and expert-parallel plans
(`dg_edit.hf_adapter.parallel_load_kwargs`) and PyTorch distributed do the sharding; this module only
keeps the ranks in step. Ranks other than 0 never open a socket or read stdin: `load_engine` does not
return on them.

Keeping in step, and failing cleanly:
- Sampling must be identical on every rank: the logits are replicated (the LM head is), and a request
  without a seed gets one from rank 0.
- Each command carries a fingerprint of rank 0's previous result; a rank whose own differs stops the
  launch ("out of step") instead of producing garbage or hanging.
- A request error (bad input, non-finite logits) is raised the same way on every rank and costs that
  request only. Any other failure in a step, or in a collective (a rank died: gloo reports "connection
  closed by peer"; a rank hung: the collective times out after `--parallel-timeout`), stops the launch:
  rank 0 answers the requests in flight with a `ParallelFailure`, stops its front end and exits 1.
- torchrun answers a rank's death by sending SIGTERM to the others. Rank 0 holds SIGTERM from the start
  (`run_launched`, before any thread exists) and takes it in a watcher thread, so that it too answers
  the requests in flight before it stops, instead of dying mid-frame.
- While idle, rank 0 sends a heartbeat every quarter of the timeout, so idle ranks never time out and a
  dead rank is found without waiting for a request.
- Loading is agreed in two rounds (cheap checks, then the shard): a rank that cannot load stops every
  rank, and rank 0 reports that rank's own message.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import os
import secrets
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

from .errors import UsageError

DEFAULT_TIMEOUT_S = 300.0  # any one collective (a step's all-reduce, a command): a hung rank is found this late
LOAD_TIMEOUT_S = 1800.0  # ranks agreeing that each loaded its shard (a 26B shard from a slow disk takes minutes)
STOP_GRACE_S = 5.0  # after a failure: time for the requests in flight to be answered before the front end stops
EXIT_DEADLINE_S = 15.0  # then the front end has this long to exit before the process is ended outright
EXIT_FAILED = 1

class ParallelFailure(RuntimeError):
    """The ranks can no longer be kept in step (a rank died or hung, a step failed): the launch is stopping."""


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    """--parallel/--parallel-timeout: for the commands that can run under torchrun (infill, serve, lsp)."""
    parser.add_argument("--parallel", choices=("tp", "ep"), default=None,
                        help="run under torchrun with the model sharded over its ranks: tp (tensor parallel: "
                             "attention heads and expert widths split) or ep (expert parallel: whole experts "
                             "dealt out, attention on every rank); rank 0 serves, the others follow")
    parser.add_argument("--parallel-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                        help=f"longest wait for any one collective before the launch is declared failed "
                             f"(default {DEFAULT_TIMEOUT_S:g})")


def parallel_requested(argv: list[str]) -> bool:
    return any(a == "--parallel" or a.startswith("--parallel=") for a in argv)


# ------------------------------------------------------------------------------------ what every rank runs
@dataclass(frozen=True)
class Command:
    """One call, broadcast by rank 0. `check` is the fingerprint of rank 0's previous result."""

    op: str  # open | step | forget | derive | retire | ping | stop
    args: tuple = ()
    check: int = 0


def fingerprint(outcome: Any) -> int:
    """A cheap digest of a command's result that must be equal on every rank (token ids, not timings)."""
    from .events import Done, Step
    from .scheduler import StepOutcome

    if isinstance(outcome, StepOutcome):
        key = ("batch", outcome.forwards, outcome.events)
    elif isinstance(outcome, Step):
        key: Any = ("step", outcome.index, outcome.ids)
    elif isinstance(outcome, Done):
        key = ("done", outcome.ids, outcome.steps)
    elif isinstance(outcome, BaseException):
        key = ("raise", type(outcome).__name__, str(outcome))
    else:
        key = ("other", outcome if outcome is None or isinstance(outcome, str) else type(outcome).__name__)
    return zlib.crc32(repr(key).encode("utf-8", "backslashreplace"))


def is_request_error(exc: BaseException) -> bool:
    """Errors every rank raises alike that cost one request (bad input; NaN logits, found after the step's
    collectives). Anything else leaves the ranks' collectives in an unknown state."""
    return isinstance(exc, (ValueError, FloatingPointError))


class Mirror:
    """What every rank holds identically: engines by id; `run` applies a command.

    Rank 0 and the followers run the very same code here, which is what keeps their forwards in step.
    """

    def __init__(self, engine, rank: int):
        from . import hf_adapter as hf

        self.rank = rank
        self.leader: Leader | None = None  # rank 0's, set once it exists (before any request)
        self.engines: dict[int, Any] = {}
        self.outcome = 0  # fingerprint of the last command's result
        self.counts = {"streams": 0, "events": 0, "decoder_passes": 0, "encoder_passes": 0, "request_steps": 0,
                       "most_batched": 0}
        self._attach(0, engine)
        model = engine.model

        def count(key: str):
            def hook(module, args, kwargs):
                self.counts[key] += 1
            return hook

        # The decoder itself: a batched step runs it without the model's own forward.
        hf.decoder_module(model).register_forward_pre_hook(count("decoder_passes"), with_kwargs=True)
        hf.encoder_module(model).register_forward_pre_hook(count("encoder_passes"), with_kwargs=True)

    def _attach(self, engine_id: int, engine) -> None:
        """Put the engine's scheduler in lockstep: rank 0's broadcasts each step's plan; the others follow."""
        def run_step(plan) -> Any:
            assert self.leader is not None, "rank 0 ran a step before its launch was set up"
            return self.leader.call("step", engine_id, plan)

        engine.scheduler.lockstep(run_step if self.rank == 0 else None,
                                  fatal=lambda error: not is_request_error(error))
        self.engines[engine_id] = engine

    def busy(self) -> bool:
        """Some engine has requests waiting or running."""
        return any(engine.scheduler.busy for engine in list(self.engines.values()))

    def run(self, command: Command) -> Any:
        try:
            result = self._apply(command.op, command.args)
        except BaseException as e:
            self.outcome = fingerprint(e)
            raise
        self.outcome = fingerprint(result)
        return result

    def _apply(self, op: str, args: tuple) -> Any:
        if op == "open":  # build the request on every rank; it joins its engine's queue (same id everywhere)
            engine_id, method, call_args, kwargs = args
            events = getattr(self.engines[engine_id], method)(*call_args, **kwargs)
            self.counts["streams"] += 1
            return events  # rank 0's consumer reads it; the other ranks' requests run by the plans alone
        if op == "step":
            engine_id, plan = args
            engine = self.engines.get(engine_id)
            if engine is None:  # retired while its scheduler planned this step: nothing runs, on any rank
                return None
            outcome = engine.scheduler.apply(plan)
            self.counts["events"] += len(outcome.events)
            self.counts["request_steps"] += outcome.forwards
            self.counts["most_batched"] = max(self.counts["most_batched"], outcome.forwards)
            return outcome
        if op == "forget":
            engine_id, session = args
            self.engines[engine_id].forget(session)
            return None
        if op == "derive":
            parent, child, settings = args
            self._attach(child, self.engines[parent].with_settings(settings))
            return None
        if op == "retire":  # an engine replaced by a derived one: its caches go on every rank
            engine = self.engines.pop(args[0], None)
            if engine is not None:
                engine.close()
            return None
        raise ValueError(f"unknown command {op!r}")


class Channel:
    """Rank 0 -> every rank, over a gloo group of its own (CPU objects, whatever the model's backend)."""

    def __init__(self, group, rank: int, world_size: int):
        self.group = group
        self.rank = rank
        self.world_size = world_size

    def send(self, command: Command) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([command], src=0, group=self.group)

    def receive(self) -> Command:
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.group)
        return out


def _say(rank: int, world_size: int, message: str) -> None:
    print(f"dg-edit: rank {rank}/{world_size}: {message}", file=sys.stderr, flush=True)


def _summary(channel: Channel, mirror: Mirror) -> None:
    """Every rank's counters, printed by rank 0 (equal counts show that every rank ran the same steps)."""
    counts = channel.gather(dict(mirror.counts))
    if channel.rank == 0:
        for rank, c in enumerate(counts):
            _say(rank, channel.world_size, f"{c['streams']} streams, {c['events']} events, "
                                           f"{c['decoder_passes']} decoder passes ({c['request_steps']} request "
                                           f"steps, at most {c['most_batched']} in one pass), "
                                           f"{c['encoder_passes']} encoder passes")


# ------------------------------------------------------------------------------------ the other ranks
def follow(channel: Channel, mirror: Mirror) -> int:
    """Run rank 0's commands until it says stop; returns the exit code. Never touches a socket or stdin."""
    rank, world = channel.rank, channel.world_size
    while True:
        try:
            command = channel.receive()
        except Exception as e:  # rank 0 died, or a collective timed out
            _say(rank, world, f"lost rank 0 ({type(e).__name__}: {e}); stopping")
            return EXIT_FAILED
        if command.op == "stop":
            try:
                _summary(channel, mirror)
            except Exception as e:  # rank 0 is gone already: nothing left to report to
                _say(rank, world, f"no summary ({type(e).__name__}: {e})")
            return 0
        if command.op == "ping":
            continue
        if command.check != mirror.outcome:
            _say(rank, world, f"out of step with rank 0 before {command.op!r}: its last result differs from "
                              "this rank's; stopping the launch")
            return EXIT_FAILED
        try:
            mirror.run(command)
        except Exception as e:
            if not is_request_error(e):
                _say(rank, world, f"{command.op} failed ({type(e).__name__}: {e}); stopping the launch")
                return EXIT_FAILED


# ------------------------------------------------------------------------------------ rank 0
class Leader:
    """Rank 0's side: broadcasts each command, then runs it locally, under one lock; watches for failure."""

    def __init__(self, channel: Channel, mirror: Mirror, mode: str, timeout_s: float, backend: str):
        self.channel = channel
        self.mirror = mirror
        self.mode = mode
        self.backend = backend
        self.timeout_s = timeout_s
        self.failure: str | None = None
        self.channel_broken = False
        self._wire = threading.Lock()
        self._ids = iter(range(1, 2**62))
        self._last_sent = time.monotonic()
        self._closed = threading.Event()
        self._stopping = threading.Lock()
        threading.Thread(target=self._heartbeat, name="dg-edit-heartbeat", daemon=True).start()
        if _sigterm_held():
            threading.Thread(target=self._watch_sigterm, name="dg-edit-sigterm", daemon=True).start()

    def new_id(self) -> int:
        return next(self._ids)

    def call(self, op: str, *args) -> Any:
        """Broadcast one command, then run it here; request errors pass through, anything else fails the launch."""
        with self._wire:
            if self.failure is not None:
                raise ParallelFailure(self.failure)
            command = Command(op, args, self.mirror.outcome)
            try:
                self.channel.send(command)
            except Exception as e:
                raise self._fail(f"rank 0 could not reach the other ranks ({type(e).__name__}: {e})",
                                 broken=True) from None
            self._last_sent = time.monotonic()
            try:
                return self.mirror.run(command)
            except Exception as e:
                if is_request_error(e):
                    raise
                raise self._fail(f"a step failed on rank 0 ({type(e).__name__}: {e}); a rank may have died or "
                                 "hung", broken=True) from e
            except BaseException:  # interrupted mid-step: the other ranks wait in a collective rank 0 left
                self._fail("rank 0 was interrupted mid-step", broken=True)
                raise

    def _fail(self, reason: str, broken: bool) -> ParallelFailure:
        """Record the first failure; answer what is in flight, then stop the front end (in a thread)."""
        if self.failure is None:
            self.failure = f"the parallel launch has failed: {reason}; this server is stopping"
            self.channel_broken = broken
            _say(0, self.channel.world_size, self.failure)
            threading.Thread(target=self._stop_front_end, name="dg-edit-stop", daemon=True).start()
        elif broken:
            self.channel_broken = True
        return ParallelFailure(self.failure)

    def _stop_front_end(self) -> None:
        deadline = time.monotonic() + STOP_GRACE_S
        while self.mirror.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the front end writes the last answers
        if not self._closed.is_set():
            signal.raise_signal(signal.SIGINT)  # each front end stops cleanly on Ctrl-C
        time.sleep(EXIT_DEADLINE_S)
        if not self._closed.is_set():
            _say(0, self.channel.world_size, f"the front end did not stop within {EXIT_DEADLINE_S:g} s; exiting")
            _hard_exit(EXIT_FAILED)

    def _heartbeat(self) -> None:
        interval = max(self.timeout_s / 4, 0.5)
        while not self._closed.wait(interval / 2):
            if self.failure is not None:
                return
            if time.monotonic() - self._last_sent < interval or not self._wire.acquire(timeout=interval / 2):
                continue
            try:
                if self.failure is None and not self._closed.is_set():
                    self.channel.send(Command("ping"))
                    self._last_sent = time.monotonic()
            except Exception as e:
                self._fail(f"a rank stopped answering while idle ({type(e).__name__}: {e})", broken=True)
            finally:
                self._wire.release()

    def _watch_sigterm(self) -> None:
        signal.sigwait({signal.SIGTERM})
        if not self._closed.is_set():
            self._fail("rank 0 got SIGTERM (torchrun sends it when another rank has exited, or when the launch "
                       "is stopped)", broken=False)

    def close(self) -> int:
        """Stop every rank (with a summary of what each ran) and leave the process group; exit code."""
        if self._closed.is_set():
            return EXIT_FAILED if self.failure else 0
        with self._stopping:
            self._closed.set()
            import torch.distributed as dist

            with self._wire:
                if not self.channel_broken:
                    try:
                        self.channel.send(Command("stop"))
                        _summary(self.channel, self.mirror)
                    except Exception as e:
                        self.channel_broken = True
                        _say(0, self.channel.world_size, f"could not stop the other ranks ({type(e).__name__}: {e})")
                if not self.channel_broken:
                    dist.destroy_process_group()
        return EXIT_FAILED if self.failure else 0


class ParallelEngine:
    """Rank 0's engine under --parallel: the `Engine` interface, with every call run on every rank.

    Reads (tokenizer, settings, sampling, name, canvas_length, last_encoded, ...) come from rank 0's own
    engine; calls that run the model or change state are mirrored. `infill`, `rewrite` and `infill_ids`
    run the engine's own methods with this object as `self`, so they go through `stream*` below.
    """

    def __init__(self, leader: Leader, engine, engine_id: int = 0):
        self._leader = leader
        self._engine = engine
        self._id = engine_id

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    @property
    def observer(self):
        """Rank 0's engine's step observer (`dg-edit serve` sets its metrics here, on this wrapper)."""
        return self._engine.observer

    @observer.setter
    def observer(self, value) -> None:
        self._engine.observer = value

    def _open(self, method: str, args: tuple, kwargs: dict) -> Iterator:
        """Open the request on every rank; its steps then run in the scheduler's lockstep batches."""
        if kwargs.get("seed") is None:  # every rank must draw the same noise: rank 0 picks the seed
            kwargs = {**kwargs, "seed": secrets.randbits(63)}
        return self._leader.call("open", self._id, method, args, kwargs)

    def stream(self, *args, **kwargs) -> Iterator:
        return self._open("stream", args, kwargs)

    def stream_rewrite(self, *args, **kwargs) -> Iterator:
        return self._open("stream_rewrite", args, kwargs)

    def stream_ids(self, *args, **kwargs) -> Iterator:
        return self._open("stream_ids", args, kwargs)

    def infill(self, *args, **kwargs):
        from .engine import Engine

        return Engine.infill(self, *args, **kwargs)

    def rewrite(self, *args, **kwargs):
        from .engine import Engine

        return Engine.rewrite(self, *args, **kwargs)

    def infill_ids(self, *args, **kwargs):
        from .engine import Engine

        return Engine.infill_ids(self, *args, **kwargs)

    def stream_next_edit(self, *args, **kwargs) -> Iterator:
        """Built on rank 0 (its edit histories, window and prompt), run as a mirrored `stream_rewrite`."""
        from .engine import Engine

        return Engine.stream_next_edit(self, *args, **kwargs)

    def next_edit(self, *args, **kwargs):
        from .engine import Engine

        return Engine.next_edit(self, *args, **kwargs)

    def _next_edit_events(self, *args, **kwargs) -> Iterator:
        from .engine import Engine

        return Engine._next_edit_events(self, *args, **kwargs)

    def prepare_next_edit(self, session: str, text: str, cursor: int, **kwargs) -> None:
        """Off under --parallel, as idle prefill: a background request on rank 0 alone would run collectives
        the other ranks never join. A next-edit request is answered when asked."""

    def forget(self, session: str) -> None:
        self._leader.call("forget", self._id, session)

    def prefill(self, session: str, text: str, extra=()) -> None:
        """Idle prefill is off under --parallel: background encoder work on rank 0 alone would run
        collectives the other ranks never join, and every rank's caches must stay the same."""

    def close(self) -> None:
        """Drop this engine's caches on every rank (it is being replaced)."""
        self._leader.call("retire", self._id)

    def with_settings(self, settings) -> "ParallelEngine":
        child = self._leader.new_id()
        self._leader.call("derive", self._id, child, settings)
        return ParallelEngine(self._leader, self._leader.mirror.engines[child], child)

    def info(self) -> dict[str, Any]:
        world = self._leader.channel.world_size
        return {**self._engine.info(), "parallel": {"mode": self._leader.mode, "world_size": world,
                                                    "backend": self._leader.backend}}


# ------------------------------------------------------------------------------------ launching
# The one launch of this process, as torch.distributed's default group is the one of this process:
# `run_launched` (cli.main) ends it when the command returns.
_launch: Leader | None = None


def _sigterm_held() -> bool:
    return signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def _hard_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def run_launched(run: Callable[[], int]) -> int:
    """Run a command under --parallel (called by the CLI's `main`); returns the exit code.

    On rank 0, SIGTERM is held before anything else (a thread started later inherits the mask), so the
    launch's watcher thread, not the default action, decides what it means.
    """
    if os.environ.get("RANK", "0") == "0":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        code = run()
    except KeyboardInterrupt:
        code = 130
    return finish(code)


def finish(code: int) -> int:
    """End this process's launch, if it has one: the other ranks stop; a failed launch exits 1 at once."""
    global _launch
    leader, _launch = _launch, None
    if leader is None:
        return code
    result = leader.close()
    if result:
        _hard_exit(result)  # a broken gloo group aborts in its destructor: leave without running it
    return code


def _backend(torch) -> tuple[str, Any]:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return "nccl", torch.device("cuda", local_rank)
    return "gloo", None


def _agree(channel: Channel, error: str | None, what: str) -> None:
    """Every rank reports how its part went; any failure stops all ranks, with the failing ranks' messages."""
    try:
        errors = channel.gather(error)
    except RuntimeError as e:  # a rank died while loading (torchrun stops the launch): say so, not a traceback
        if channel.rank != 0:
            raise SystemExit(2) from None
        raise UsageError(f"a rank stopped before it could report on its shard ({e})") from None
    failed = [(rank, message) for rank, message in enumerate(errors) if message]
    if not failed:
        return
    import torch.distributed as dist

    dist.destroy_process_group()
    if channel.rank != 0:
        if error:  # this node's own log says why too (rank 0's log has every rank's message)
            _say(channel.rank, channel.world_size, f"{what}: {error}; the launch stops")
        raise SystemExit(2)
    by_message: dict[str, list[int]] = {}
    for rank, message in failed:
        by_message.setdefault(message, []).append(rank)
    world = channel.world_size
    raise UsageError("; ".join(
        f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))} of {world} {what}: {message}"
        for message, ranks in by_message.items()))


def _attempt(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    try:
        return fn(), None
    except UsageError as e:
        return None, str(e)
    except Exception as e:  # reported to rank 0, which stops the launch with it
        message = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
        return None, message


def load_engine(args: argparse.Namespace) -> ParallelEngine:
    """Join the torchrun launch and load this rank's shard. Returns rank 0's engine; on the other ranks it
    follows rank 0's commands and exits the process when told to stop (it never returns there)."""
    global _launch
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UsageError(f"--parallel {args.parallel} runs under torchrun, e.g. torchrun --nproc-per-node 2 -m "
                         "dg_edit.cli ... (RANK and WORLD_SIZE are not set)")
    if not args.parallel_timeout > 0:
        raise UsageError(f"--parallel-timeout must be > 0 seconds, got {args.parallel_timeout}")
    import torch
    import torch.distributed as dist

    from . import hf_adapter as hf
    from .startup import load_options, settings_from_args
    from .engine import Engine, check_model_dir, default_model_dir

    try:  # --device, --device-map and --quantize do not combine with --parallel (LoadOptions says why)
        options = dataclasses.replace(load_options(args), parallel=(args.parallel, int(os.environ["WORLD_SIZE"])))
    except ValueError as e:
        raise UsageError(str(e)) from None
    settings = settings_from_args(args)
    mode = args.parallel
    backend, device_id = _backend(torch)
    timeout = timedelta(seconds=args.parallel_timeout)
    dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id)
    rank, world = dist.get_rank(), dist.get_world_size()
    startup = Channel(dist.new_group(backend="gloo", timeout=timedelta(seconds=LOAD_TIMEOUT_S)), rank, world)
    channel = Channel(dist.new_group(backend="gloo", timeout=timeout), rank, world)

    def check() -> None:
        hf.check_transformers()
        path = check_model_dir(settings.model or default_model_dir())
        hf.check_model_type(path)
        hf.parallel_load_kwargs(path, mode, world)

    _, error = _attempt(check)
    _agree(startup, error, "cannot use its model")
    engine, error = _attempt(lambda: Engine.load(settings.model or None, settings=settings, options=options))
    _agree(startup, error, "cannot load its shard")
    mirror = Mirror(engine, rank)
    _say(rank, world, f"pid {os.getpid()} holds its {mode} shard on {engine.model.device} ({backend})")
    if rank != 0:
        # torchrun passes a Ctrl-C to every rank; rank 0 stops its front end and then tells the others,
        # with their summaries. A follower leaving on its own would only make that last word fail.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        code = follow(channel, mirror)
        if code == 0:
            dist.destroy_process_group()
            sys.exit(0)
        _hard_exit(code)
    _launch = mirror.leader = Leader(channel, mirror, mode, args.parallel_timeout, backend)
    atexit.register(finish, 0)  # a front end run without `run_launched` still stops the other ranks
    return ParallelEngine(_launch, engine)
