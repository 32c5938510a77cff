"""What several test modules share: tiny runs, trained fixture students, export flags, the kernel device."""
