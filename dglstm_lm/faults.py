"""Fault injection for the reliability tests.

DGLSTM_FAULT=<point>:<n> kills this process with SIGKILL the n-th time execution passes <point>:
  step              mid optimizer step (after backward, before the update)
  checkpoint_write  half-way through writing a checkpoint's temporary file
  checkpoint_write_linked  after best.pt points at a new checkpoint, before last.pt is replaced by it
  eval_batch        during an evaluation
  epoch_end         between epochs (after the epoch's checkpoint, before the next epoch)
  cache_write       preparing the data cache: its files written, its manifest not yet
Unset (always, outside the tests) it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("DGLSTM_FAULT", "")
_POINT, _, _N = _SPEC.partition(":")
_COUNT = {"n": 0}


def point(name: str) -> None:
    if _POINT and name == _POINT:
        _COUNT["n"] += 1
        if _COUNT["n"] == int(_N or 1):
            os.kill(os.getpid(), signal.SIGKILL)
