import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # The tiny networks here gain nothing from a second thread, and on a shared 2-core
    # machine two threads that wait on each other make a step many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)
