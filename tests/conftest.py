"""Fixtures shared by the test files."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors: extra intra-op threads only add overhead, and on a busy 2-core CI machine
    they can slow a test tenfold. Restored afterwards, so other tests are untouched. A file
    that wants it for every test says ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
