"""Fixtures shared by the test files."""
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny tensors: extra intra-op threads only add overhead, and on a busy 2-core CI machine
    they can slow a test tenfold. Restored afterwards, so other tests are untouched. A file
    that wants it for every test says ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def run_main(capsys, monkeypatch):
    """train.main(argv) here: (exit status, all it printed, the warnings it raised)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")        # train.py then leaves the threads alone

    def call(argv):
        code = 0
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                train.main(argv)
            except SystemExit as e:
                code = e.code
        out = capsys.readouterr()
        text = out.out + out.err + (code if isinstance(code, str) else "")
        return code, text, [str(w.message) for w in caught]
    return call
