"""The one seam where peft and transformers 5 disagree, kept narrow so nothing else is hidden.

peft (0.21, the newest release) builds every ``PeftModel`` with ``getattr(model, "is_gradient_checkpointing",
True)``, a property transformers 5 deprecated in favour of ``is_activation_checkpointing``: each adapter
created or loaded (train, merge, eval of an adapter) printed a ``FutureWarning`` that users can do nothing
about. The property still returns the right value, so only that message is silenced, only around the
construction of the peft model; any other warning still reaches the user.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

DEPRECATED_PROBE = r"`is_gradient_checkpointing` is deprecated"


@contextlib.contextmanager
def building_peft_model() -> Iterator[None]:
    """Wrap ``get_peft_model`` / ``PeftModel.from_pretrained`` calls in this."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DEPRECATED_PROBE, category=FutureWarning)
        yield
