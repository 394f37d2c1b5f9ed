"""One module per legacy job system: its record codec (and, later, its intake and migration)."""
