"""CpuSlots: at most n threads hold a slot at once; a wait gives the slot up; waiting for a slot keeps beating."""

from __future__ import annotations

import threading
import time

from botworker.slots import CpuSlots


def test_at_most_n_threads_hold_a_slot_at_once() -> None:
    slots = CpuSlots(2, lambda: None)
    inside, most = 0, 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal inside, most
        for _ in range(20):
            with slots.hold():
                with lock:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0.001)
                with lock:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert most == 2 and inside == 0


def test_a_wait_hands_the_slot_to_another_thread_and_takes_it_back() -> None:
    slots = CpuSlots(1, lambda: None)
    order: list[str] = []
    waiting = threading.Event()

    def other() -> None:
        waiting.wait(5)
        with slots.hold():  # only possible while the first thread waits
            order.append("other ran")

    thread = threading.Thread(target=other)
    thread.start()
    with slots.hold():
        with slots.waiting():
            waiting.set()
            thread.join(5)
            with slots.waiting():  # nested: nothing more to give up
                order.append("nested wait")
        order.append("slot back")
    assert order == ["other ran", "nested wait", "slot back"]


def test_waiting_without_a_slot_changes_nothing() -> None:
    slots = CpuSlots(1, lambda: None)
    with slots.waiting(), slots.hold():  # (a pop, a back-off between messages: no slot held, so none given up)
        pass


def test_a_thread_waiting_for_a_slot_keeps_beating() -> None:
    beats: list[float] = []
    slots = CpuSlots(1, lambda: beats.append(time.monotonic()))
    release = threading.Event()

    def holder() -> None:
        with slots.hold():
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    time.sleep(0.05)
    waiter = threading.Thread(target=lambda: slots.hold().__enter__())
    waiter.start()
    time.sleep(0.8)
    release.set()
    thread.join(5)
    waiter.join(5)
    assert len(beats) >= 2  # every 0.25 s while the slot was taken
