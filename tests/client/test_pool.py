"""PagePool: fixed at creation, contiguous leases, waits instead of growing."""

from __future__ import annotations

import asyncio

import pytest

from netswap.client.pool import PagePool

PS = 4096


async def test_leases_are_disjoint_views_of_one_region() -> None:
    pool = PagePool(8)
    a = await pool.acquire(3)
    b = await pool.acquire(5)
    assert len(a.view) == 3 * PS and len(b.view) == 5 * PS
    a.view[:] = b"\x01" * len(a.view)
    b.view[:] = b"\x02" * len(b.view)
    assert bytes(a.view) == b"\x01" * 3 * PS  # b did not overlap a
    assert pool.free_pages == 0
    assert pool.try_acquire(1) is None
    a.release()
    b.release()
    assert pool.free_pages == 8
    # all merged back into one run: the whole pool can be leased at once
    whole = pool.try_acquire(8)
    assert whole is not None
    whole.release()
    pool.close()


async def test_exhausted_pool_blocks_and_never_grows() -> None:
    pool = PagePool(4)
    nbytes = pool.nbytes
    held = await pool.acquire(4)
    waiter = asyncio.create_task(pool.acquire(2))
    await asyncio.sleep(0.01)
    assert not waiter.done(), "an exhausted pool must make callers wait"
    assert pool.nbytes == nbytes and pool.capacity == 4
    held.release()
    lease = await asyncio.wait_for(waiter, 1)
    assert len(lease.view) == 2 * PS
    lease.release()
    assert pool.free_pages == 4
    pool.close()


async def test_fifo_large_request_is_not_starved() -> None:
    pool = PagePool(4)
    a = await pool.acquire(2)
    b = await pool.acquire(2)
    big = asyncio.create_task(pool.acquire(4))
    await asyncio.sleep(0)
    small = asyncio.create_task(pool.acquire(1))
    a.release()  # two pages free: enough for `small`, but `big` is first in line
    await asyncio.sleep(0.01)
    assert not small.done() and not big.done()
    assert pool.try_acquire(1) is None  # nor may anyone jump the queue
    b.release()
    big_lease = await asyncio.wait_for(big, 1)
    assert not small.done()
    big_lease.release()
    (await asyncio.wait_for(small, 1)).release()
    assert pool.free_pages == 4
    pool.close()


async def test_cancelled_waiter_gives_way() -> None:
    pool = PagePool(2)
    held = await pool.acquire(2)
    first = asyncio.create_task(pool.acquire(2))
    second = asyncio.create_task(pool.acquire(1))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    held.release()
    (await asyncio.wait_for(second, 1)).release()
    assert pool.free_pages == 2
    pool.close()


async def test_release_twice_is_harmless_and_fragments_merge() -> None:
    pool = PagePool(6)
    leases = [await pool.acquire(1) for _ in range(6)]
    for i in (1, 3, 5, 0, 4, 2):  # give back out of order
        leases[i].release()
        leases[i].release()
    assert pool.free_pages == 6
    assert pool.try_acquire(6) is not None
    pool.close()


@pytest.mark.parametrize("pages", [0, -1, 5])
def test_impossible_leases_are_refused(pages: int) -> None:
    pool = PagePool(4)
    with pytest.raises(ValueError, match="cannot lease"):
        pool.try_acquire(pages)
    pool.close()


async def test_cancelled_waiter_already_dropped_by_a_release() -> None:
    pool = PagePool(2)
    held = await pool.acquire(2)
    waiter = asyncio.create_task(pool.acquire(2))
    await asyncio.sleep(0)
    waiter.cancel()
    held.release()  # runs before the waiter resumes, and drops its cancelled future
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pool.free_pages == 2
    pool.close()


async def test_close_waits_for_outstanding_leases() -> None:
    pool = PagePool(4)
    lease = await pool.acquire(1)
    waiter = asyncio.create_task(pool.acquire(4))
    await asyncio.sleep(0)
    pool.close()  # must not fail while a lease is out
    with pytest.raises(ValueError, match="closed"):
        await waiter
    with pytest.raises(ValueError, match="closed"):
        pool.try_acquire(1)
    lease.view[0] = 1  # still usable until released
    lease.release()
    assert pool.free_pages == 4
