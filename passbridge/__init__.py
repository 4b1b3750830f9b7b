"""passbridge: wallet-pass lifecycle events into Klaviyo.

The ``passbridge`` package is the small shared core that both sides import: the canonical event
(:mod:`passbridge.event`), settings, the Redis key layout and Lua scripts (:mod:`passbridge.keys`,
:mod:`passbridge.scripts`), the account registry, logging set-up, the embedded Redis server and the CLI.
"""

__version__ = "0.1.0"
