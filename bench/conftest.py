"""pytest-benchmark entry to the same cases `fastrl bench` runs: `pytest bench/ --benchmark-only`.

FASTRL_BENCH=quick (default) runs the quick cases, FASTRL_BENCH=full the full sweeps; FASTRL_BENCH_DEVICE picks
the device (default: cuda when available). pytest-benchmark records time only (in its own JSON, with
--benchmark-json); peak memory and the CSV come from `fastrl bench`, which runs each memory case in a fresh process.
Files here are named bench_*.py; this conftest makes pytest collect them.
"""
import pytest


def pytest_collect_file(file_path, parent):
    # a bench_*.py named on the command line is collected by pytest itself already
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None

