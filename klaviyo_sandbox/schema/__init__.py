"""The compact Klaviyo schema the sandbox ships, and validators compiled from it."""

from klaviyo_sandbox.schema.loader import SpecDocument, load_spec

__all__ = ["SpecDocument", "load_spec"]
