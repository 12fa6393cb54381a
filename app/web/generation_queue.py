"""The threads every generation runs on (/generate, /arena and OpenAI's /v1), a bounded number of
requests at a time, and how a generation stops once its client has left.

Generation has its own threads, so that /health and every other request never wait behind it.
A generation whose client hung up stops at its next token instead of decoding for nobody.
"""

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from starlette.exceptions import HTTPException

# Generation runs on one CPU thread. Decoding one token is a chain of small matrix-vector products
# where handing work between OpenMP threads costs more than it saves, and when a training job
# keeps the cores busy the threads stall waiting for each other. With torch's OpenMP backend the
# setting is per thread, so the training thread keeps all of its threads.
GENERATION_THREADS = 1
# half the cores (training keeps the rest), and at most GENERATION_QUEUE requests running or
# waiting for one; beyond that, 429 with Retry-After instead of an ever longer queue
GENERATION_WORKERS = max(2, (os.cpu_count() or 2) // 2)
GENERATION_QUEUE = 32
GENERATION_RETRY_AFTER_S = 5


class Abandoned(Exception):
    """The client of a generation left: its work stopped at the next token."""


class GenerationQueue:
    """Generation on threads of its own, a bounded number of requests at a time.

    A request takes a slot (429 with Retry-After when all GENERATION_QUEUE are taken) and its work
    runs on one of GENERATION_WORKERS threads, each decoding on GENERATION_THREADS CPU threads.
    The event loop meanwhile waits for the client to hang up (client_gone); if it does, the work's
    `cancelled` flag is set and `until` ends it before the next token. Slots are taken and given
    back on the event loop only, so `taken` needs no lock."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(GENERATION_WORKERS, thread_name_prefix="generate",
                                       initializer=torch.set_num_threads, initargs=(GENERATION_THREADS,))
        self.taken = 0

    @contextmanager
    def slot(self):
        if self.taken >= GENERATION_QUEUE:
            raise HTTPException(429, f"the server is busy: {self.taken} generations are running or waiting, the most it "
                                     f"takes at once; try again in {GENERATION_RETRY_AFTER_S} s",
                                headers={"Retry-After": str(GENERATION_RETRY_AFTER_S)})
        self.taken += 1
        try:
            yield
        finally:
            self.taken -= 1

    async def run(self, request, work, *args):
        """work(cancelled, *args) on a generation thread -> its result; Abandoned if the client left."""
        cancelled = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(self.pool, work, cancelled, *args)
        gone = asyncio.ensure_future(client_gone(request))
        try:
            await asyncio.wait([future, gone], return_when=asyncio.FIRST_COMPLETED)
            if gone.done():
                cancelled.set()  # the work raises Abandoned at its next token; we wait for that
            return await future
        finally:
            gone.cancel()
            cancelled.set()  # this request was cancelled itself (the server is shutting down)

    async def each(self, items):
        """The items of a generator, each made on a generation thread. A stream that stops asking
        (its client left) stops the generator before its next item."""
        loop = asyncio.get_running_loop()
        while (item := await loop.run_in_executor(self.pool, next, items, None)) is not None:
            yield item


async def client_gone(request):
    """Returns once the client has hung up. The body is read by now, so the server's next message
    is the disconnect (Starlette's is_disconnected() peeks without waiting, which the
    @app.middleware layers in between never answer in time)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def until(cancelled, pieces):
    """The pieces of a generation, each made only while `cancelled` is unset (a request whose
    client left while it waited for a thread never starts): then Abandoned."""
    pieces = iter(pieces)
    while not cancelled.is_set():
        piece = next(pieces, None)
        if piece is None:
            return
        yield piece
    raise Abandoned("the client left; generation stopped")
