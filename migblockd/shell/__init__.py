"""``migblock-shell``: an interactive and scripting QMP shell for migblockd."""
