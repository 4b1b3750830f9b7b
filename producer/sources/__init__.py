"""Pure logic of the event sources (no I/O): Apple pass tokens, Google ECv2 verification, signers for tests."""
