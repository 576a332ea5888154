import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def load_benchmark():
    """Loads a script of benchmarks/ as a module, so tests can call its functions.

    Returns:
        A function taking the script's name without ``.py`` and returning the module.
    """
    import importlib.util
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def load(name):
        spec = importlib.util.spec_from_file_location(
            f"{name}_script", os.path.join(root, "benchmarks", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session()


def _fuzz_counts():
    """{parser: {outcome: count}} of this process's fuzzed inputs (empty if none ran)."""
    import sys

    fuzz = sys.modules.get("test_fuzz_parsers")
    if fuzz is None:
        return {}
    return {parser: dict(outcomes) for parser, outcomes in fuzz.TRIED.items()}


# Under pytest-xdist the fuzz tests run in a worker process: each worker hands its counts
# to the controller, which prints the summary.
_WORKER_COUNTS = []


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["fuzz_tried"] = _fuzz_counts()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _WORKER_COUNTS.append(getattr(node, "workeroutput", {}).get("fuzz_tried", {}))


def pytest_terminal_summary(terminalreporter):
    """Prints how many inputs each fuzzed parser was given (issue 7 asks for the count)."""
    import collections

    tried = collections.defaultdict(collections.Counter)
    for counts in [_fuzz_counts(), *_WORKER_COUNTS]:
        for parser, outcomes in counts.items():
            tried[parser].update(outcomes)
    if not tried:
        return
    terminalreporter.section("fuzzed parsers: inputs tried")
    for parser, outcomes in sorted(tried.items()):
        total = sum(outcomes.values())
        terminalreporter.write_line(
            f"{parser:32s} {total:6d} inputs ({outcomes['refused']} refused with the "
            f"documented error, {outcomes['parsed']} parsed)")
