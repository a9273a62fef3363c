"""The garbage collector under `serve`: start-up frozen, the oldest generation collected on a clock."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from proxy.http import collector

from .waiting import eventually


@pytest.fixture
def gc_state():
    """The interpreter's collector as it was, afterwards (other tests share it)."""
    saved = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*saved)


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def garbage_in_the_oldest_generation() -> weakref.ref:
    """A reference cycle that is garbage and sits where only a full collection looks."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    gc.collect(1)  # survivors of the young generations move to the oldest
    ref = weakref.ref(a)
    del a, b
    for _ in range(collector.FULL_AFTER):  # as many middle-generation collections as Python waits for
        gc.collect(1)
    assert ref() is not None  # no young collection finds it
    return ref


def test_tune_gc_freezes_start_up_and_takes_over_the_oldest_generation(gc_state):
    gc.set_threshold(700, 10, 10)
    assert collector.tune_gc()
    assert gc.get_freeze_count() > 0  # the modules and objects of start-up
    assert gc.get_threshold() == (700, 10, collector.NEVER)


def test_tune_gc_leaves_an_operators_own_settings(gc_state):
    gc.set_threshold(700, 10, 50)
    assert not collector.tune_gc()
    assert gc.get_threshold() == (700, 10, 50)
    assert gc.get_freeze_count() == 0


async def test_idle_the_oldest_generation_is_collected(gc_state, monkeypatch):
    monkeypatch.setattr(collector, "CHECK_SECONDS", 0.01)
    gc.set_threshold(700, 10, 10)
    collector.tune_gc()
    ref = garbage_in_the_oldest_generation()
    task = asyncio.ensure_future(collector.collect_forever(lambda: False))
    try:
        await eventually(lambda: ref() is None)
    finally:
        task.cancel()


async def test_under_load_that_never_pauses_it_is_collected_every_full_busy_seconds(gc_state, monkeypatch):
    monkeypatch.setattr(collector, "CHECK_SECONDS", 0.01)
    monkeypatch.setattr(collector, "FULL_BUSY_SECONDS", 0.2)
    gc.set_threshold(700, 10, 10)
    collector.tune_gc()
    ref = garbage_in_the_oldest_generation()
    task = asyncio.ensure_future(collector.collect_forever(lambda: True))
    try:
        await eventually(lambda: ref() is None)
    finally:
        task.cancel()
