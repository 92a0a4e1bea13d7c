"""pytest plugin: SMTP sinks and private Postfix instances on loopback."""

import pytest

from world.postfix import PostfixInstance
from world.smtp_peers import SmtpSink


@pytest.fixture
def smtp_sink_factory():
    """Callable(**SmtpSink kwargs) -> a started SmtpSink; all stopped at teardown."""
    sinks = []

    def create(**kwargs) -> SmtpSink:
        sink = SmtpSink(**kwargs)
        sinks.append(sink)
        return sink.start()

    yield create
    problems = []
    for sink in reversed(sinks):
        try:
            sink.stop()
        except Exception as error:  # keep stopping the others
            problems.append(repr(error))
    assert not problems, problems


@pytest.fixture
def smtp_sink(smtp_sink_factory):
    """A started plain SmtpSink on 127.0.0.1 (no STARTTLS offered)."""
    return smtp_sink_factory()


@pytest.fixture
def postfix_factory():
    """Callable(start=True, **PostfixInstance kwargs) -> PostfixInstance.

    Every instance is stopped and its temp root removed at teardown, also when the test
    failed; teardown then fails loudly if any daemon of an instance survived.
    """
    instances = []

    def create(start: bool = True, **kwargs) -> PostfixInstance:
        instance = PostfixInstance(**kwargs)
        instances.append(instance)  # before start(): a failed start still gets stopped
        return instance.start() if start else instance

    yield create
    problems = []
    for instance in reversed(instances):
        try:
            instance.stop()
        except Exception as error:  # keep stopping the others
            problems.append(repr(error))
        if instance.processes() or instance.root.exists():
            problems.append(f"Postfix under {instance.root} survived teardown")
    assert not problems, problems
