"""The engine loop over a fake generator: streaming, stops, limits, cancellation, failures."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from backends._exllama.engine import EngineLoop, EngineStopped, JobSpec, Ticket
from gateway.errors import EngineError, GatewayError
from gateway.types import Delta, Finish, SamplingParams, TextDelta, Usage
from tests.backends.exllama.fakes import (
    EOS,
    PAGE,
    FakeGenerator,
    FakeModel,
    Script,
    endless,
    plan,
    words,
)


class ListSink:
    """Collects a ticket's items; ``wait`` blocks until its Finish or error."""

    def __init__(self) -> None:
        self.items: list[Delta | GatewayError] = []
        self.done = threading.Event()

    def put(self, item: Delta | GatewayError) -> None:
        self.items.append(item)
        if isinstance(item, Finish | GatewayError):
            self.done.set()

    def wait(self, timeout: float = 10.0) -> list[Delta | GatewayError]:
        assert self.done.wait(timeout), f"no finish; got {self.items}"
        return self.items

    @property
    def text(self) -> str:
        return "".join(i.text for i in self.items if isinstance(i, TextDelta))

    @property
    def finish(self) -> Finish:
        last = self.items[-1]
        assert isinstance(last, Finish), last
        return last


Factory = Callable[..., tuple[EngineLoop, FakeModel]]


def make_engine(
    script: Script, *, batch: int = 4, pages: int = 64, step_delay_s: float = 0.0
) -> tuple[EngineLoop, FakeModel]:
    gen = FakeGenerator(max_batch_size=batch, max_pages=pages, step_delay_s=step_delay_s)
    model = FakeModel(plan(batch=batch, cache=pages * PAGE), gen, script)
    return EngineLoop(model, "test"), model


@pytest.fixture
def engine_factory() -> Iterator[Factory]:
    engines: list[EngineLoop] = []

    def build(script: Script, **kw: float) -> tuple[EngineLoop, FakeModel]:
        engine, model = make_engine(script, **kw)  # type: ignore[arg-type]
        engine.start()
        engines.append(engine)
        return engine, model

    yield build
    for e in engines:
        e.stop(timeout_s=5)


def spec(prompt_len: int = 5, max_new: int = 50, **sampling: float) -> JobSpec:
    return JobSpec(
        input_ids=tuple(range(100, 100 + prompt_len)),
        max_new_tokens=max_new,
        sampling=SamplingParams(**sampling),  # type: ignore[arg-type]
        stop_token_ids=(EOS,),
    )


def submit(
    engine: EngineLoop, job: JobSpec, stops: tuple[str, ...] = ()
) -> tuple[Ticket, ListSink]:
    sink = ListSink()
    ticket = engine.submit(job, stops=stops, prompt_tokens=len(job.input_ids), sink=sink)
    return ticket, sink


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_stream_until_stop_token(engine_factory: Factory) -> None:
    engine, model = engine_factory(words("Hello"))
    _, sink = submit(engine, spec(prompt_len=7))
    sink.wait()
    assert sink.text == "Hello"
    assert all(isinstance(i, TextDelta) and i.tokens == 1 for i in sink.items[:-1])
    # EOS is a generated token too (as vLLM counts it)
    assert sink.finish == Finish("stop", Usage(prompt_tokens=7, completion_tokens=6))
    assert model.generator.num_remaining_jobs() == 0
    stats = engine.stats()
    assert stats.tokens_generated == 6 and stats.active_sequences == 0
    assert stats.kv_cells_used == 0 and stats.kv_cells_total == 64 * PAGE


def test_max_new_tokens_is_length(engine_factory: Factory) -> None:
    engine, _ = engine_factory(endless("ab"))
    _, sink = submit(engine, spec(max_new=4))
    sink.wait()
    assert sink.text == "abababab"
    assert sink.finish.reason == "length"
    assert sink.finish.usage.completion_tokens == 4


def test_stop_string_split_across_tokens_cancels_the_job(
    engine_factory: Factory,
) -> None:
    engine, model = engine_factory(words("one two three four five six"))
    _, sink = submit(engine, spec(max_new=100), stops=("thr",))
    sink.wait()
    assert sink.text == "one two "
    finish = sink.finish
    assert finish.reason == "stop"
    # "one two thr": 11 tokens sampled when the stop string completed
    assert finish.usage.completion_tokens == 11
    assert sum(i.tokens for i in sink.items if isinstance(i, TextDelta)) <= 11
    job = model.jobs[0]
    assert job in model.generator.cancelled and job.pages == 0
    assert job.new_tokens == 11, "the engine ran no step after the stop string"
    assert engine.stats().kv_cells_used == 0


def test_stop_string_prefix_released_at_the_end(
    engine_factory: Factory,
) -> None:
    engine, _ = engine_factory(words("abc ab"))
    _, sink = submit(engine, spec(), stops=("abx",))
    sink.wait()
    assert sink.text == "abc ab"  # the held-back "ab" is flushed when the job ends
    assert sink.finish.reason == "stop"


def test_concurrent_jobs_share_steps(engine_factory: Factory) -> None:
    engine, _ = engine_factory(words("0123456789"), batch=4)
    sinks = [submit(engine, spec(prompt_len=3 + i))[1] for i in range(6)]
    for s in sinks:
        s.wait()
        assert s.text == "0123456789"
        assert s.finish.usage.completion_tokens == 11
    stats = engine.stats()
    assert stats.max_batch_sequences == 4  # never more than the generator's batch
    assert stats.tokens_generated == 66


def test_cached_tokens_from_prefix_reuse(engine_factory: Factory) -> None:
    engine, _ = engine_factory(words("hi"))
    first = submit(engine, spec(prompt_len=600))[1]
    first.wait()
    second = submit(engine, spec(prompt_len=600))[1]
    second.wait()
    assert first.finish.usage.cached_tokens == 0
    assert second.finish.usage.cached_tokens == 2 * PAGE
    assert engine.stats().cached_prompt_tokens == 2 * PAGE


def test_cancel_while_decoding_frees_pages(
    engine_factory: Factory,
) -> None:
    engine, model = engine_factory(endless(), step_delay_s=0.002)
    ticket, sink = submit(engine, spec(max_new=10_000))
    wait_until(lambda: len(sink.items) >= 3)
    assert engine.stats().kv_cells_used > 0
    engine.cancel(ticket)
    wait_until(lambda: model.generator.num_remaining_jobs() == 0)
    stats = engine.stats()
    assert stats.cancelled == 1 and stats.active_sequences == 0
    assert stats.kv_cells_used == 0
    assert model.jobs[0] in model.generator.cancelled
    produced = len(sink.items)
    time.sleep(0.02)
    assert len(sink.items) == produced, "nothing is sent after a cancel"
    assert not any(isinstance(i, Finish) for i in sink.items)
    assert stats.tokens_after_cancel <= 1


def test_cancel_while_queued(engine_factory: Factory) -> None:
    engine, model = engine_factory(endless(), batch=1, step_delay_s=0.002)
    running, _ = submit(engine, spec(max_new=10_000))
    queued, queued_sink = submit(engine, spec(max_new=10))
    wait_until(lambda: len(model.jobs) == 2)
    assert model.jobs[1] in model.generator.pending
    engine.cancel(queued)
    wait_until(lambda: model.jobs[1] in model.generator.cancelled)
    assert queued_sink.items == []
    engine.cancel(running)
    wait_until(lambda: model.generator.num_remaining_jobs() == 0)
    assert engine.stats().cancelled == 2


def test_cancel_before_the_engine_saw_it(
    engine_factory: Factory,
) -> None:
    engine, model = make_engine(words("abc"))
    ticket, sink = submit(engine, spec())
    engine.cancel(ticket)
    engine.start()
    try:
        done = submit(engine, spec())[1]
        done.wait()
        assert sink.items == [] and len(model.jobs) == 1
        assert engine.stats().cancelled == 1
    finally:
        engine.stop()


def test_job_too_big_for_the_cache_fails_alone(
    engine_factory: Factory,
) -> None:
    engine, _ = engine_factory(words("ok"), pages=4)
    _, bad = submit(engine, spec(prompt_len=900, max_new=900))
    _, good = submit(engine, spec())
    err = bad.wait()[-1]
    assert isinstance(err, EngineError) and "refused" in err.message
    good.wait()
    assert good.text == "ok"


def test_make_job_failure_fails_that_ticket(
    engine_factory: Factory,
) -> None:
    engine, model = engine_factory(words("ok"))
    model.fail_make_job = True
    _, sink = submit(engine, spec())
    assert isinstance(sink.wait()[-1], EngineError)
    model.fail_make_job = False
    _, sink = submit(engine, spec())
    sink.wait()
    assert sink.text == "ok"


def test_generator_failure_fails_running_and_engine_recovers(
    engine_factory: Factory,
) -> None:
    engine, model = engine_factory(endless(), step_delay_s=0.002)
    sinks = [submit(engine, spec(max_new=4000))[1] for _ in range(2)]
    wait_until(lambda: all(len(s.items) >= 2 for s in sinks))
    model.generator.fail_next_iterate = RuntimeError("CUDA error: an illegal memory access")
    for s in sinks:
        err = s.wait()[-1]
        # issue 23 finding 11: the library's text is the log's, not the client's
        assert isinstance(err, EngineError) and "illegal memory access" not in err.message
    assert model.generator.num_remaining_jobs() == 0
    model.script = words("back")
    _, sink = submit(engine, spec())
    sink.wait()
    assert sink.text == "back"


def test_a_crashed_loop_reports_its_failure(engine_factory: Factory) -> None:
    """A bug outside the generator's own calls ends the loop: open tickets fail, and the
    engine says why (the pool then marks the model failed and reloads it)."""
    engine, _model = engine_factory(endless(), step_delay_s=0.002)
    _, sink = submit(engine, spec(max_new=10_000))
    wait_until(lambda: len(sink.items) >= 2)
    assert engine.failure is None

    def broken() -> bool:
        raise RuntimeError("a bug in the loop")

    engine._step = broken  # type: ignore[method-assign]
    err = sink.wait()[-1]
    assert isinstance(err, EngineError) and "a bug in the loop" not in err.message
    wait_until(lambda: engine.failure is not None)
    assert engine.failure == "RuntimeError: a bug in the loop"
    with pytest.raises(EngineStopped):
        submit(engine, spec())


def test_error_result_fails_only_its_job(
    engine_factory: Factory,
) -> None:
    engine, model = engine_factory(endless(), step_delay_s=0.002)
    bad_ticket, bad = submit(engine, spec(max_new=10_000))
    _, good = submit(engine, spec(max_new=30))
    model.generator.fail_jobs.add(bad_ticket.id)
    err = bad.wait()[-1]
    assert isinstance(err, EngineError) and "job exploded" in err.message
    good.wait()
    assert good.finish.reason == "length"


def test_stop_fails_open_tickets_and_refuses_new_ones() -> None:
    engine, model = make_engine(endless(), step_delay_s=0.002)
    engine.start()
    _, sink = submit(engine, spec(max_new=10_000))
    wait_until(lambda: len(sink.items) >= 2)
    engine.stop()
    assert isinstance(sink.wait()[-1], EngineStopped)
    assert model.generator.num_remaining_jobs() == 0
    with pytest.raises(EngineStopped):
        submit(engine, spec())


def test_idle_engine_waits_without_spinning(
    engine_factory: Factory,
) -> None:
    engine, model = engine_factory(words("a"))
    submit(engine, spec())[1].wait()
    steps = model.generator.iterations
    time.sleep(0.05)
    assert model.generator.iterations == steps


class BrokenGrammar:
    """A sequence's grammar that fails after some tokens (what the engine reads of it)."""

    def __init__(self) -> None:
        self.failed: str | None = None


def test_a_failed_grammar_fails_only_its_job_and_frees_it(engine_factory: Factory) -> None:
    engine, model = engine_factory(endless(), step_delay_s=0.002)
    grammar = BrokenGrammar()
    constrained = replace(spec(max_new=10_000), constraint=grammar)  # type: ignore[arg-type]
    _, bad = submit(engine, constrained)
    _, good = submit(engine, spec(max_new=40))
    wait_until(lambda: len(bad.items) >= 2)
    grammar.failed = "token 7 does not satisfy the grammar"
    err = bad.wait()[-1]
    assert isinstance(err, EngineError) and "output grammar failed: token 7" in err.message
    good.wait()
    assert good.finish.reason == "length"
    wait_until(lambda: model.generator.num_remaining_jobs() == 0)
    assert len(model.generator.cancelled) == 1, "the failed job left the generator"
