"""A real predictor process with a fault injected, for the canary analysis test.

    python tests/faulty_predictor.py ERROR_SHARE SLOW_SHARE SLOW_SECONDS <fineserve.serving args>

The server, protocol and metrics are fineserve's own; only `predict` is wrapped: a share of
requests fails inside the model (HTTP 500, as a crashing model would) and another share waits
``SLOW_SECONDS`` first (a model stuck on a slow path).
"""

import asyncio
import random
import sys

from fineserve.serving import server
from fineserve.serving.entrypoint import main
from fineserve.serving.predictor import TextClassifierModel


class FaultyModel(TextClassifierModel):
    """The predictor, failing or stalling on a share of its requests."""

    async def predict(self, payload, headers=None):
        draw = random.random()
        if draw < ERROR_SHARE:
            raise RuntimeError("injected fault: the model crashed")
        if draw < ERROR_SHARE + SLOW_SHARE:
            await asyncio.sleep(SLOW_SECONDS)
        return await super().predict(payload, headers)


if __name__ == "__main__":  # (not again in the forward processes, which spawn from here)
    ERROR_SHARE, SLOW_SHARE, SLOW_SECONDS = (float(v) for v in sys.argv[1:4])
    del sys.argv[1:4]
    server.TextClassifierModel = FaultyModel
    main()
