import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session()


def pytest_terminal_summary(terminalreporter):
    """Prints how many inputs each fuzzed parser was given (issue 7 asks for the count)."""
    import sys

    fuzz = sys.modules.get("test_fuzz_parsers")
    if fuzz is None or not fuzz.TRIED:
        return
    terminalreporter.section("fuzzed parsers: inputs tried")
    for parser, outcomes in sorted(fuzz.TRIED.items()):
        total = sum(outcomes.values())
        terminalreporter.write_line(
            f"{parser:32s} {total:6d} inputs ({outcomes['refused']} refused with the "
            f"documented error, {outcomes['parsed']} parsed)")
