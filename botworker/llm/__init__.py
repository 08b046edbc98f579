"""Reply generation: ``make_responder`` picks the responder of this worker (the interface is in ``responder``).

Two implementations:
- ``gemini.GeminiResponder`` when GEMINI_KEY is set: native function calling, retries, real token counts. It is
  the only module that imports the Gemini SDK (imported here only when a key is configured). A Gemini failure
  raises ``LLMError``: the pipeline answers with its apology and one ``bot_errors`` event. The offline responder
  is never a silent fallback for a configured key.
- ``OfflineResponder`` otherwise (the demo, the tests): deterministic replies from the bot's prompt, the detected
  tool results and the message, with no network, marked ``model: "offline"``. Pattern detection (``detect.py``)
  is how its tools run; with Gemini it stays as a hint (its results are part of the request).
"""

from __future__ import annotations

import logging

from ..config import Config
from .offline import OfflineResponder
from .responder import Responder

log = logging.getLogger(__name__)

__all__ = ["OfflineResponder", "Responder", "make_responder"]


def make_responder(cfg: Config) -> Responder:
    """Gemini when a key is configured, else the offline responder. Called in each worker after the fork; the
    Gemini client itself is created at the first request."""
    if cfg.gemini_key:
        from .gemini import GeminiResponder  # the SDK is imported only by processes that use it

        return GeminiResponder(cfg)
    log.info("GEMINI_KEY is not set: replies come from the offline responder")
    return OfflineResponder()
