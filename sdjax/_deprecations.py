"""The one place where the Flax deprecation notices of diffusers and transformers are silenced.

diffusers 0.39 and transformers 4.x log "Flax classes are deprecated ..." each time a Flax model or
scheduler is built. We pin those versions on purpose (see README), so the notice says nothing new; every
other message from both libraries still gets through. `sdjax.models` calls this right after importing the
Flax classes, so the filter sits on each of their module loggers (and on the libraries' own handlers).
"""

import logging

_NOTICE = "classes are deprecated and will be removed"
_LIBRARIES = ("diffusers", "transformers")


class _DropFlaxDeprecationNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _NOTICE not in record.getMessage()


_FILTER = _DropFlaxDeprecationNotice()


def silence_flax_deprecation_notices() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.get_logger("diffusers")  # make both libraries attach their handlers
    transformers_logging.get_logger("transformers")
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.split(".")[0] in _LIBRARIES]
    handlers = [h for name in _LIBRARIES for h in logging.getLogger(name).handlers]
    for target in loggers + handlers:
        if _FILTER not in target.filters:
            target.addFilter(_FILTER)
