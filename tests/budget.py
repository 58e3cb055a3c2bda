"""The suite's time budget, reported at the end of every pytest run (a plugin that tests/conftest.py loads).

`make test` must stay under 25 minutes on the project's 2-core machines, and `make test-fast` under 5. The
report names the suite's wall time against its budget and every test whose own time (setup + call + teardown,
so a session fixture counts in the first test that asks for it) passes the per-test budget, so creep shows in
every run's output. It fails the run only past a generous ceiling (--suite-ceiling, 60 minutes), so a slow or
loaded machine never blocks a landing: the budget is a report about the tests' own times, not a timed
assertion about the product.
"""

import time

import pytest

_durations: dict[str, float] = {}
_start = time.monotonic()


def pytest_addoption(parser):
    group = parser.getgroup("budget", "the suite's time budget")
    group.addoption("--suite-budget", type=float, default=25 * 60, help="seconds the suite should take (reported)")
    group.addoption("--suite-ceiling", type=float, default=60 * 60, help="seconds past which the run fails")
    group.addoption("--test-budget", type=float, default=60, help="seconds one test should take (reported)")


def pytest_sessionstart(session):
    global _start
    _start = time.monotonic()


def pytest_runtest_logreport(report):
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def _over(config) -> list[tuple[float, str]]:
    limit = config.getoption("--test-budget")
    return sorted(((d, nodeid) for nodeid, d in _durations.items() if d > limit), reverse=True)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    elapsed = time.monotonic() - _start
    if elapsed > session.config.getoption("--suite-ceiling") and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _durations:
        return
    elapsed = time.monotonic() - _start
    budget, ceiling = config.getoption("--suite-budget"), config.getoption("--suite-ceiling")
    write = terminalreporter.write_line
    terminalreporter.section("time budget")
    verdict = "within" if elapsed <= budget else "OVER"
    write(f"suite: {elapsed / 60:.1f} min for {len(_durations)} tests, {verdict} its budget of {budget / 60:.0f} min")
    over = _over(config)
    limit = config.getoption("--test-budget")
    if over:
        write(f"{len(over)} tests over the per-test budget of {limit:.0f} s:")
        for duration, nodeid in over:
            write(f"  {duration:7.1f} s  {nodeid}")
    else:
        write(f"no test over the per-test budget of {limit:.0f} s")
    if elapsed > ceiling:
        write(f"FAILED: the suite took {elapsed / 60:.1f} min, past its ceiling of {ceiling / 60:.0f} min")
