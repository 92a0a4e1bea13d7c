"""Milter protocol negotiation, with pymilter 1.0.5's shortcomings worked around.

MILTER_FLAGS are the actions stsmilter asks the MTA for (QUARANTINE for [milter]
on_violation = hold, SETSYMLIST for the @symlist macro lists); the daemon also passes
them to Milter.set_flags() for MTAs that do not negotiate.
"""

from __future__ import annotations

import logging
from typing import Tuple

import Milter

log = logging.getLogger("stsmilter")

MILTER_FLAGS = Milter.QUARANTINE | Milter.SETSYMLIST


class NegotiatingMilter(Milter.Base):
    """Milter.Base with pymilter 1.0.5's negotiation fixed; also the base of the no-op
    baseline milter in bench/, so both negotiate exactly alike."""

    def negotiate(self, opts):
        # Milter.Base.negotiate, with the macro lists worked out once per class: it
        # runs for every MTA connection, and looking them up through the callback
        # methods (an AttributeError raised and caught for each one without a list)
        # was a fifth of the milter's user-space instructions per transaction.
        try:
            offered, protocol, _, _ = opts
            self._actions = offered
            if offered & Milter.SETSYMLIST:
                # An MTA without SETSYMLIST just sends its configured macros: not an error.
                for stage, macros in self._macro_lists():
                    self._ctx.setsymlist(stage, macros)
            opts[1] = self._protocol = protocol & ~self.protocol_mask()
            opts[2] = opts[3] = 0
        except Exception:
            # pymilter would swallow the error and fall back to "all options": the MTA
            # then sends headers and body and waits for a reply to every step.
            log.warning("milter protocol negotiation failed; the MTA will send every protocol step")
            return Milter.ALL_OPTS
        # pymilter would claim every action the MTA offers; ask only for ours.
        opts[0] = self._actions = offered & MILTER_FLAGS
        return Milter.CONTINUE

    @classmethod
    def _macro_lists(cls) -> Tuple[Tuple[int, str], ...]:
        """((stage, "macro macro"), ...) from the callbacks' @Milter.symlist, in the
        order Milter.Base.negotiate asks for them."""
        lists = cls.__dict__.get("_macro_lists_of_class")  # this class's own, not a base's
        if lists is None:
            found = []
            for name, stage in Milter.MACRO_CALLBACKS.items():
                macros = getattr(getattr(cls, name), "_symlist", None)
                if macros is not None:
                    found.append((stage, " ".join(macros)))
            lists = cls._macro_lists_of_class = tuple(found)
        return lists

    def setsymlist(self, stage, *macros):
        # pymilter 1.0.5's Base.setsymlist hands the C module bytes, which it refuses
        # under Python 3 (a TypeError): pass a str.
        if self._actions & Milter.SETSYMLIST:
            self._ctx.setsymlist(stage, " ".join(macros))
