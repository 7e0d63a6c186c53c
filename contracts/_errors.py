"""The exception tree: every error chainyard raises on purpose derives from `ChainyardError`.

    ChainyardError
    ├── ConfigError        (also ValueError)    a config file that cannot be used: file and field
    ├── ChainTimeout       (also TimeoutError)  no terminal event in time; the chain may still run
    ├── NoSuchChain        (also LookupError)   the tenant has no chain of that id (client)
    ├── PermissionDenied                         the NATS user may not publish or subscribe
    │                                            on a subject the call needs (client)
    ├── ProviderError                            a provider call failed, classified (`cls`)
    ├── ServerError        (also RuntimeError)  the embedded nats-server did not start
    └── DlqError                                a dead-letter command that cannot be done

It sits beside the contracts, at the bottom of the import graph, so every layer can raise it
and a caller catches one base. Errors of the NATS client (nats.errors) and of the standard
library pass through unchanged: they are not chainyard's to rename.
"""

from __future__ import annotations


class ChainyardError(Exception):
    """The base of every error chainyard raises on purpose."""


class ConfigError(ChainyardError, ValueError):
    """A configuration file that cannot be used; the message names the file and the field."""


class ChainTimeout(ChainyardError, TimeoutError):
    """No terminal event arrived in time; the chain may still be running."""
