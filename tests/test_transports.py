"""Which device a transport's rows live on, checked with CPU stand-ins (scripts/cuda_check.py
runs the real thing on a GPU machine): the "meta" device stands in for a GPU where only the
choice of device matters."""
import torch
import torch.distributed as dist

from hvd_shufflebn.transports import base
from hvd_shufflebn.transports.torch_distributed import TorchDistributedTransport


def test_a_rank_with_no_rows_submits_them_on_the_others_device():
    """Horovod with GPU collectives refuses an all-to-all where one rank's tensor is on the CPU
    and the others' on a GPU; a rank with nothing to send must still use the rows' device."""
    sent, counts = base.pack_rows({}, 3, 5, torch.device("meta"))
    assert sent.device.type == "meta" and sent.shape == (0, 5) and counts == [0, 0, 0]
    rows = {2: torch.ones(1, 5, device="meta")}
    sent, counts = base.pack_rows(rows, 3, 5, torch.device("meta"))
    assert sent.device.type == "meta" and counts == [0, 0, 1]


def fake_group(monkeypatch, backend):
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_process_group_ranks", lambda group: [0, 1])
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return TorchDistributedTransport(group=object())


def test_torch_distributed_keeps_cuda_rows_on_their_own_device_under_nccl(monkeypatch):
    """NCCL is found in the default multi-backend group too ("cpu:gloo,cuda:nccl"), and the rows
    stay on the INPUT's device, not on the current device."""
    for backend in ("nccl", "cpu:gloo,cuda:nccl"):
        transport = fake_group(monkeypatch, backend)
        assert transport.rows_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
        assert transport.rows_device(torch.device("cpu")) == torch.device("cpu")
    transport = fake_group(monkeypatch, "gloo")  # Gloo: through the host
    assert transport.rows_device(torch.device("cuda", 1)) == torch.device("cpu")
