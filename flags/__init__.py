"""The cutover flags: what they are, how their value is resolved, and how they change.

- ``shadow`` (bool, default true): compute everything, send nothing.
- ``bill_from`` (unix seconds or null): the boundary T; the control plane bills only buckets
  starting at or after T, the legacy biller only those before it.
- ``authority`` (``legacy`` | ``controlplane``; ``cell``/``edge`` accepted as aliases): who bills.

Resolution is layered, lowest first: built-in default < config ``[flags]`` < environment
(``SHADOW``, ``BILL_FROM``, ``PRO_BILLING_AUTHORITY``) < runtime value set through the API or
CLI and kept in storage. Every runtime change is written with its audit record in one
transaction.
"""

from controlplane.flags.definitions import FLAGS, Authority, FlagSpec
from controlplane.flags.resolve import FlagValue, Snapshot, resolve
from controlplane.flags.service import FlagChange, set_flags

__all__ = [
    "FLAGS",
    "Authority",
    "FlagChange",
    "FlagSpec",
    "FlagValue",
    "Snapshot",
    "resolve",
    "set_flags",
]
