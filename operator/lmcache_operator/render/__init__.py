"""Pure spec → manifest functions: no I/O, so every field is unit-testable."""
