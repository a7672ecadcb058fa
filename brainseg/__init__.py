"""Library modules shared by the project's scripts."""
