"""Importing the handler once before forking, so the workers share its pages.

A generation's mold (:mod:`prefork.mold.process`; ``--preload``, on by
default) and the master of a program serving through :mod:`prefork.api`
import the module here, then move every object made so far into the
collector's permanent generation (``gc.freeze()``, as the CPython
documentation advises before forking): a worker's collections then never
write to those objects' headers, so their pages stay shared copy-on-write.
The workers serve the object the importing process holds
(``Config.handler_object``). With ``--no-preload`` each worker imports the
handler after it is forked and pays for everything the import builds in
private memory.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time

from prefork.config import Config
from prefork.workers.loading import handler_for, load_configured

log = logging.getLogger(__name__)


def preload_handler(config: Config) -> Config:
    """``config`` with its handler imported here and the collector frozen; raises HandlerLoadError."""
    began = time.monotonic()
    gc.disable()  # no collection during the import: it would leave freed holes among the pages kept shared
    try:
        handler = config.handler_object
        if handler is None:
            handler = load_configured(config)
        preloaded = dataclasses.replace(config, handler_object=handler)
        handler_for(preloaded)  # what a worker checks (the relay's needs too), so it cannot fail there
        gc.freeze()
    finally:
        gc.enable()
    log.info("imported %s in %.2fs; %d object(s) frozen for the workers to share",
             config.effective_handler, time.monotonic() - began, gc.get_freeze_count())
    return preloaded
