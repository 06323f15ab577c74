"""The lowest layer, imported by every other: the one error type, the CLI exit wrapper, atomic file writes, device choice."""
