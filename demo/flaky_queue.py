"""A job queue that misbehaves the way real ones do: it delivers jobs more
than once, runs duplicates at the same time, and loses workers half-way.

Each delivery runs in its own process. The delivery function reports through
a pipe; when the process dies (SIGKILL) or the key is in progress elsewhere,
the job goes back to the end of the queue.
"""
import multiprocessing as mp
import random
import signal
import time
from collections import Counter, deque


def crash():
    """Die like a worker whose machine lost power: no cleanup, no goodbye."""
    import os

    os.kill(os.getpid(), signal.SIGKILL)


def deliveries(jobs, rng: random.Random):
    """Each job one to three times, duplicates next to each other."""
    queue = deque()
    for job in jobs:
        for _ in range(rng.choice([1, 1, 2, 2, 3])):
            queue.append(job)
    return queue


def run(queue: deque, workers: int, deliver, describe, crash_once: set) -> Counter:
    """Runs `deliver(job, crash, pipe)` for every delivery, `workers` at a
    time. `describe(job, status, payload)` returns the line to print.
    Returns how many deliveries ended in each status ('crashed' included)."""
    counts = Counter()
    running = []
    number = 0
    ctx = mp.get_context("fork")
    while queue or running:
        while queue and len(running) < workers:
            job = queue.popleft()
            number += 1
            crash_now = job["id"] in crash_once
            crash_once.discard(job["id"])
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=deliver, args=(job, crash_now, child))
            p.start()
            child.close()
            running.append((p, parent, job, number))
        time.sleep(0.005)
        for entry in list(running):
            p, pipe, job, n = entry
            if p.is_alive():
                continue
            p.join()
            running.remove(entry)
            messages = []
            try:
                while pipe.poll():
                    messages.append(pipe.recv())
            except EOFError:
                pass
            status, payload = messages[-1] if messages else ("lost", None)
            if p.exitcode == -signal.SIGKILL:
                status = "crashed"
            counts[status] += 1
            print(f"delivery {n:3d}  {job['id']:<14} {describe(job, status, payload)}")
            if status in ("crashed", "in_progress", "lost"):
                queue.append(job)
    counts["deliveries"] = number
    return counts
