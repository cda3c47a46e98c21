"""Ring 2's block exchange on the GPUs' copy engines, through symmetric memory.

Each rank copies its block into its own slot of a symmetric buffer, tells the peer that the slot is
ready, waits for the peer's slot to be ready and pulls it into a new tensor: a peer-to-peer copy
that the copy engines make, taking no SM from the attention and matmuls it overlaps (NCCL's
send/receive kernels take several). Then it tells the peer that it has read the peer's slot; a
rank writes a slot again only once the peer has read it. The signals are one-place semaphores of
the symmetric memory (``put_signal`` waits for the previous one to be taken, ``wait_signal``
takes it), per slot: ready on channel ``slot``, read on channel ``SLOTS + slot``. Consecutive
exchanges use the slots in turn, so a rank rarely waits to write; the result is ready as soon as
this rank has pulled, without waiting for the peer's pull as a closing barrier would.

Everything runs on a side stream; the result is registered as the work of a functional collective,
so ``wait_tensor`` (where the compiled graph first uses it) makes the compute stream wait for it.
"""

from __future__ import annotations

import dataclasses

import torch

SLOTS = 2


@dataclasses.dataclass
class _Exchange:
    """One group's symmetric buffer (``SLOTS`` slots of ``slot_bytes``), its handle and side stream."""

    buffer: torch.Tensor
    handle: object
    stream: torch.cuda.Stream
    slot_bytes: int
    next_slot: int = 0


_EXCHANGES: dict[str, _Exchange] = {}
_OUTGROWN: list[_Exchange] = []  # kept alive: CUDA graphs captured on a smaller buffer still use it


def prepare(group: str, nbytes: int, device: torch.device) -> int:
    """The slot for the next exchange of ``nbytes`` over ``group``, the buffer made (or grown) now.

    Called where the graph is traced, on every rank alike (the rendezvous is a collective): made at
    the first exchange instead, the rendezvous would allocate inside a CUDA graph's memory pool."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed import _symmetric_memory as symm_mem
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    exchange = _EXCHANGES.get(group)
    if exchange is None or exchange.slot_bytes < nbytes:
        if exchange is not None:
            _OUTGROWN.append(exchange)
        symm_mem.enable_symm_mem_for_group(group)
        with unset_fake_temporarily(), disable_proxy_modes_tracing():
            buffer = symm_mem.empty(SLOTS * nbytes, dtype=torch.uint8, device=device)
            exchange = _Exchange(buffer, symm_mem.rendezvous(buffer, group), torch.cuda.Stream(device), nbytes)
            for slot in range(SLOTS):  # every slot starts read: the first write of each need not wait
                exchange.handle.put_signal(1 - exchange.handle.rank, channel=SLOTS + slot)
        _EXCHANGES[group] = exchange
    slot = exchange.next_slot
    exchange.next_slot = (slot + 1) % SLOTS
    return slot


class _Recorded(torch._C._distributed_c10d.Work):
    """Done when the side stream reaches the point where it was made."""

    def __init__(self):
        super().__init__()
        self.event = torch.cuda.Event()
        self.event.record()

    def wait(self, timeout=None) -> bool:
        self.event.wait()
        return True


@torch.library.custom_op("para_fx::swap_pair", mutates_args=())
def swap_pair(x: torch.Tensor, group: str, slot: int) -> torch.Tensor:
    """The other rank's ``x`` (a ring of 2), through slot ``slot`` of the group's symmetric buffer."""
    exchange = _EXCHANGES[group]
    handle, nbytes = exchange.handle, x.numel() * x.element_size()
    received = torch.empty_like(x)
    exchange.stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(exchange.stream):
        peer, offset = 1 - handle.rank, slot * exchange.slot_bytes
        handle.wait_signal(peer, channel=SLOTS + slot)  # the peer has read what this slot held
        handle.get_buffer(handle.rank, (nbytes,), torch.uint8, offset).copy_(x.reshape(-1).view(torch.uint8))
        handle.put_signal(peer, channel=slot)  # ready
        handle.wait_signal(peer, channel=slot)  # the peer's is ready
        received.view(-1).view(torch.uint8).copy_(handle.get_buffer(peer, (nbytes,), torch.uint8, offset))
        handle.put_signal(peer, channel=SLOTS + slot)  # read; never waits: the peer took the last one before its ready
        work = _Recorded()  # after the last kernel: a CUDA graph's capture must join everything the side stream ran
    x.record_stream(exchange.stream)
    received.record_stream(exchange.stream)
    torch._C._distributed_c10d._register_work(received, work)
    return received


@swap_pair.register_fake
def _(x: torch.Tensor, group: str, slot: int) -> torch.Tensor:
    return torch.empty_like(x)
