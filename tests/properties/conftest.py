import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """Tiny models run faster on one thread, and far faster when other jobs share the cores
    (OpenMP threads spin-waiting on a busy 2-core machine cost 10-100x on ops this small)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
