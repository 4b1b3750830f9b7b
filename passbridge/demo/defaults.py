"""The demo's size and speed, in one place (``make demo`` and ``passbridge demo`` use these defaults).

Figures measured on the 2-core development machine are in BENCHMARKS.md ("make demo"); change the size here,
or per run with ``passbridge demo --passes N --rate-scale X`` (``make demo DEMO_ARGS="--passes 5000"``).
"""

from __future__ import annotations

#: Passes played (about four accepted events each, plus redeliveries and invalid items).
DEMO_PASSES = 5000
#: Klaviyo's real rate tiers run on a clock this many times faster, in the sandbox and the workers alike.
DEMO_RATE_SCALE = 20.0
#: Most seconds the queues may take to drain against the sandbox.
DEMO_DRAIN_TIMEOUT_S = 240.0
#: Against a real Klaviyo (real tiers: profile-import and record jobs at 750/min per account).
KLAVIYO_DRAIN_TIMEOUT_S = 1800.0
#: Passes played against a real Klaviyo (its tiers at real speed): about 600 events, 1,800 calls.
DEMO_KLAVIYO_PASSES = 150
#: How long sampled passes may take to show up in a real Klaviyo (events and record jobs are processed
#: asynchronously there); a pass that still differs after this is a failure.
DEMO_SETTLE_S = 300.0
#: Passes read back through Klaviyo's own read API in the real-Klaviyo mode.
DEMO_SAMPLE = 50
