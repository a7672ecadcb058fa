"""Library modules shared by the project's scripts (the scripts live at the top level)."""
