"""Third-party narration held back while the runtime loads and runs a pipeline.

diffusers and transformers draw tqdm bars while they load ("Loading pipeline components…", "Loading
weights"), log notices (a truncated prompt, a missing torchvision) and raise ``FutureWarning``s about their
own keyword arguments; torch raises ``TracerWarning``s and ``UserWarning``s from inside the modules it runs.
None of it is something the user did or can act on: what matters to them is an ``AtedmError`` or a field
of the result (``Generation.truncated_tokens``), which the CLI words itself. So the runtime's calls into
those libraries run inside :func:`quiet_libraries`, and everything it changes is put back on the way out,
so a program that imports the runtime keeps its own logging, warnings and progress bars elsewhere.

The libraries keep these switches in process-wide state (warning filters, logger levels, a bar flag): a
thread that uses diffusers while another runs inside this block is quietened too.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any


def _library_switches() -> list[tuple[Callable[[], Any], Callable[[Any], None], Callable[[], None]]]:
    """``(read, restore, silence)`` for each library's logging verbosity and progress bars."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import utils as hub
    from transformers.utils import logging as transformers_logging

    switches = []
    for library in (diffusers_logging, transformers_logging):
        switches.append((library.get_verbosity, library.set_verbosity, library.set_verbosity_error))
        bars = _bar_setter(library.enable_progress_bar, library.disable_progress_bar)
        switches.append((library.is_progress_bar_enabled, bars, library.disable_progress_bar))
    switches.append((hub.are_progress_bars_disabled, _bar_setter(hub.disable_progress_bars, hub.enable_progress_bars),
                     hub.disable_progress_bars))
    return switches


def _bar_setter(on_true: Callable[[], None], on_false: Callable[[], None]) -> Callable[[bool], None]:
    """Restore a flag that a library exposes as two functions (enable/disable) instead of a setter."""
    return lambda value: on_true() if value else on_false()


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Within the block: no warnings, no third-party progress bars, third-party logging at errors only."""
    switches = _library_switches()
    saved = [read() for read, _, _ in switches]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _, _, silence in switches:
            silence()
        try:
            yield
        finally:
            for (_, restore, _), value in zip(switches, saved):
                restore(value)
